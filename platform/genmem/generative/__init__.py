"""Probability paths, per-sample losses, ODE/SDE solvers and seeded sampling."""

from __future__ import annotations

from genmem.config import ProcessConfig
from genmem.generative.diffusion import VPDiffusion
from genmem.generative.flow import FlowMatching
from genmem.generative.process import PathSample, Process, per_sample_mse
from genmem.generative.sampling import Chained, data_clip, derive_seed, generate, sampling_grid, time_grid
from genmem.generative.solvers import odesolve, sdesolve

__all__ = [
    "Chained",
    "FlowMatching",
    "VPDiffusion",
    "PathSample",
    "Process",
    "build_process",
    "data_clip",
    "derive_seed",
    "generate",
    "odesolve",
    "per_sample_mse",
    "sampling_grid",
    "sdesolve",
    "time_grid",
]


def build_process(cfg: ProcessConfig) -> Process:
    if cfg.kind == "flow":
        return FlowMatching(ot_coupling=cfg.ot_coupling)
    return VPDiffusion(schedule=cfg.schedule, prediction=cfg.prediction)

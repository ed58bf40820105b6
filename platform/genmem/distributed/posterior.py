"""The Laplace posterior on a Ray Train worker group (METHODS.md §Riemannian Laplace): each rank
holds a shard of the training set with the (x0, t) draws the whole set gives those points, every
data sum (curvature, gradient, Hessian-vector product, loss) is all-reduced, and every rank runs
the same geodesic solver on the same reduced values, so all ranks take the same adaptive steps
and end at the same weights. One worker is the single-process posterior.

Rank 0 writes the result as a checkpoint folder (``posterior.safetensors``: curvature, θ* and
each weight sample's θ; ``meta.json``: each sample's cost and loss) that Ray persists to storage.

Usage::

    out = posterior_on_workers(checkpoint, samples=[{"seed": 1, "method": "riemannian", "scale": 0.01}],
                               scaling=ScalingConfig(num_workers=2))
    out["thetas"][0], out["samples"][0]["n_grad"]
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from genmem.config import ScalingConfig


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the ranks of the process group Ray Train set up (gloo on CPU: float64 exact to the
    order of summation, and the same result on every rank)."""
    import torch.distributed as dist

    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    from genmem.checkpoint import load_checkpoint
    from genmem.distributed.train import report_round
    from genmem.evaluation import training_data
    from genmem.generative import build_process
    from genmem.posterior import LaplacePosterior

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loaded = load_checkpoint(config["checkpoint"])
    _, train, _ = training_data(config["checkpoint"])
    sharded = world > 1
    la = LaplacePosterior(loaded.model, build_process(loaded.config.process), train.x, shard=(rank, world) if sharded else None,
                          reduce=all_reduce_sum if sharded else None, **config["laplace"]).fit()
    if config["optimize_prior"]:
        la.optimize_prior_precision()  # every evidence term is reduced, so every rank picks the same α
    probe = torch.randn(la.theta_star.numel(), generator=torch.Generator().manual_seed(0), dtype=la.theta_star.dtype)
    g, hv = la.objective.grad_and_hvp(la.theta_star + 1e-3 * probe, probe)  # a check of the reduced sums
    tensors = {"curvature": la.curvature, "theta_star": la.theta_star, "grad": g, "hvp": hv}
    samples = []
    for i, request in enumerate(config["samples"]):
        s = la.sample_one(**request, **config["solver"])
        tensors[f"theta_{i}"] = s.theta
        samples.append({**request, "n_grad": s.n_grad, "n_hvp": s.n_hvp, "loss": s.loss, "loss_increase": s.loss_increase,
                        "seconds": s.seconds})
    folder = None
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="genmem-posterior-"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "posterior.safetensors"))
        meta = {"samples": samples, "workers": world, "points": len(train.x), "prior_precision": la.prior_precision,
                "subset": la.subset}
        (folder / "meta.json").write_text(json.dumps(meta))
    report_round({"workers": world}, folder)


def posterior_on_workers(checkpoint: str, *, samples: list[dict[str, Any]], scaling: ScalingConfig,
                         laplace: dict[str, Any] | None = None, solver: dict[str, Any] | None = None,
                         optimize_prior: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Fit the Laplace posterior of ``checkpoint`` over its training data on ``scaling.num_workers``
    Ray Train workers and draw each requested weight sample in turn. ``samples`` are keyword
    arguments of :meth:`genmem.posterior.LaplacePosterior.sample_one` (``seed``, ``method``,
    ``scale``); ``laplace`` those of the posterior's constructor; ``solver`` the geodesic options
    every sample shares. Returns the curvature, θ*, the thetas in request order, the reduced
    gradient and HVP at a probe point, the prior precision and per-sample cost."""
    from genmem.distributed.train import fit_workers
    from genmem.storage import pull, storage_env

    config = {"checkpoint": str(checkpoint), "samples": list(samples), "laplace": laplace or {}, "solver": solver or {},
              "optimize_prior": optimize_prior}
    fitted = fit_workers(_worker, config, scaling, run_name or f"posterior-group-{uuid.uuid4().hex[:8]}", env=storage_env())
    folder = pull(fitted.checkpoint)
    tensors = load_file(str(folder / "posterior.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    return {"curvature": tensors["curvature"], "theta_star": tensors["theta_star"], "grad": tensors["grad"], "hvp": tensors["hvp"],
            "thetas": [tensors[f"theta_{i}"] for i in range(len(samples))], **meta}

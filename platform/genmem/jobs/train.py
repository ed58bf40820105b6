"""`genmem train`: the training loop on Ray Train workers (Accelerate inside each: DDP over N
workers, bf16 on GPU), tracked in MLflow from rank 0. The driver and the worker function are
:mod:`genmem.runs.training`, shared with every job that trains."""

from __future__ import annotations

from genmem.config import TrainConfig
from genmem.jobs.base import Context, Job, numeric
from genmem.runs.training import TrainJobResult, footprint, preflight, train_model


def run(cfg: TrainConfig, ctx: Context) -> TrainJobResult:
    return train_model(cfg, ctx)


JOB = Job(
    name="train",
    help="train a flow-matching or diffusion model on Ray Train workers",
    config=TrainConfig,
    run=run,
    example="model.hidden=128",
    footprint=footprint,
    preflight=preflight,
    metrics=("train/loss", "train/lr", "images_seen", "step", "param_spread", "eval/memorised_fraction", "eval/d1_q50",
             "eval/heldout_memorised_fraction", "eval/d1_gap_q50", "memorisation_budget_over", "memorisation_budget_stopped"),
    time_attr="images_seen",
    budget=lambda cfg: -(-cfg.images // cfg.batch_size) * cfg.batch_size,
    final_report=lambda r: {"train/loss": r["loss"], **numeric({k: r[k] for k in ("images_seen", "step", "param_spread")}),
                            # a trial ended by its memorisation budget says so (the reason is its run's tag)
                            "memorisation_budget_over": float(r["memorisation_budget"] is not None),
                            "memorisation_budget_stopped": float(r["memorisation_budget"] == "stopped")},
)

"""`genmem train`: the training loop on Ray Train workers (Accelerate inside each: DDP over N
workers, bf16 on GPU), tracked in MLflow from rank 0. The driver and the worker function are
:mod:`genmem.runs.training`, shared with every job that trains."""

from __future__ import annotations

from genmem.config import BUDGET_TAG, TrainConfig
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.report import Point, before_and_after
from genmem.runs.training import TrainJobResult, footprint, preflight, train_model
from genmem.tracking import RunView


COLUMNS = ("params.data.source", "params.images", "train/loss", "eval/memorised_fraction", "eval/fd_classifier", "eval/fd_pixels")


def run(cfg: TrainConfig, ctx: Context) -> TrainJobResult:
    return train_model(cfg, ctx, columns=COLUMNS)


def report_points(run: RunView) -> list[Point]:
    """A run that healed itself (``memorisation_budget.action: heal``): its model at the last
    crossing (θ* of the heal) and after that heal, measured on the heal's own samples."""
    if run.tags.get(BUDGET_TAG) not in ("healed", "stopped") or "heal/memorised_fraction" not in run.metrics:
        return []
    before, after = before_and_after(run.metrics, "heal/")
    policy = run.params.get("memorisation_budget.heal.policy", "?")
    points = [run.point(before, method="heal θ*", setting="at the crossing", model=run.run_name, base=True),
              run.point(after, method="heal", setting=f"{policy}, {int(run.metrics.get('heal/images', 0))} images", model=run.run_name)]
    return [p for p in points if p]


JOB = Job(
    command=COMMANDS["train"],
    config=TrainConfig,
    run=run,
    footprint=footprint,
    preflight=preflight,
    metrics=("train/loss", "train/lr", "images_seen", "step", "param_spread", "eval/memorised_fraction", "eval/d1_q50",
             "eval/heldout_memorised_fraction", "eval/d1_gap_q50", "memorisation_budget_over", "memorisation_budget_stopped",
             "memorisation_heals"),
    time_attr="images_seen",
    budget=lambda cfg: -(-cfg.images // cfg.batch_size) * cfg.batch_size,
    final_report=lambda r: {"train/loss": r["loss"], **numeric({k: r[k] for k in ("images_seen", "step", "param_spread")}),
                            # a trial ended by its memorisation budget says so (the reason is its run's tag)
                            "memorisation_budget_over": float(r["memorisation_budget"] is not None),
                            "memorisation_budget_stopped": float(r["memorisation_budget"] == "stopped"),
                            "memorisation_heals": float(len(r["heals"]))},
    report_points=report_points,
)

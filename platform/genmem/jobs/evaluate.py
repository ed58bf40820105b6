"""`genmem evaluate`: samples generated across Ray tasks (or read from Parquet), every metric
against the checkpoint's own training and held-out data, and one MLflow run with the figures."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from pydantic import Field

from genmem.config import MetricsConfig, tracked
from genmem.data import read_shards
from genmem.distributed.sampling import sample
from genmem.distributed.neighbours import neighbour_search
from genmem.evaluation import check_metrics, evaluate_samples, feature_names, training_data
from genmem.jobs.base import COMMANDS, Context, Job
from genmem.metrics.outliers import range_warning
from genmem.storage import ensure_writable, storage_root
from genmem.report import Point
from genmem.runs.evaluations import COLUMNS, log_evaluation
from genmem.tracking import RunView, check_reachable, job_run


class EvaluateConfig(MetricsConfig):
    """What `genmem evaluate` measures, against the checkpoint's own training and held-out data."""

    checkpoint: str
    n: int = Field(1000, gt=0)  # samples to generate (ignored with samples=)
    samples: str | None = None  # Parquet file/folder of samples from anywhere, instead of generating
    tasks: int | None = Field(None, gt=0)  # Ray sampling tasks


def run(cfg: EvaluateConfig, ctx: Context) -> dict[str, Any]:
    check_reachable()
    meta, train, heldout = training_data(cfg.checkpoint)
    check_metrics(cfg, train, heldout)
    tags = {"checkpoint": str(cfg.checkpoint), "checkpoint_id": meta["checkpoint_id"],
            "features": ",".join(feature_names(cfg.features, train)), **ctx.tags}
    if meta.get("mlflow_run_id"):
        tags["train_run_id"] = meta["mlflow_run_id"]
    tags["base_model"] = str(meta["config"].get("init_from") is None).lower()  # trained from scratch: a θ* in `genmem report`
    with job_run("evaluate", f"evaluate-{meta['checkpoint_id']}", params=tracked(cfg), tags=tags, columns=COLUMNS,
                 parent_run_id=ctx.parent_run_id, key=ctx.key) as tracker:
        samples_path = cfg.samples
        if not samples_path:
            out = ensure_writable(storage_root() / "samples") / f"{meta['checkpoint_id']}-seed{cfg.seed}-n{cfg.n}-{uuid.uuid4().hex[:6]}"
            samples_path = sample(cfg.checkpoint, cfg.n, out, seed=cfg.seed, tasks=cfg.tasks)["samples"]
        tracker.tags({"samples": str(samples_path)})
        result = evaluate_samples(read_shards(samples_path), train, heldout, cfg, cache_dir=storage_root() / "features",
                                  search=neighbour_search(cfg, len(train)))
        log_evaluation(tracker, result, cfg, step=meta.get("images_seen", 0))
        warning = range_warning(result.metrics["eval/out_of_range_fraction"], float(train.x.min()), float(train.x.max()))
        if warning:
            print(f"[genmem evaluate] {warning}", file=sys.stderr, flush=True)
    return {"mlflow_run_id": tracker.run_id, "samples": str(samples_path), **{k.removeprefix("eval/"): v for k, v in result.metrics.items()}}


def report_points(run: RunView) -> list[Point]:
    """The evaluated checkpoint's samples: a θ* where it was trained from scratch."""
    p = run.point(run.metrics, "eval/", method="evaluate", setting=f"checkpoint {run.tags.get('checkpoint_id', '?')}",
                  model=run.tags.get("checkpoint_id", ""), base=run.tags.get("base_model") == "true")
    return [p] if p else []


JOB = Job(
    command=COMMANDS["evaluate"],
    config=EvaluateConfig,
    run=run,
    report_points=report_points,
)

"""`genmem audit`: memorisation and quality of samples from any generator, against the data it was
trained on and (where given) data it never saw, with no genmem checkpoint. The samples, training
set and held-out set come from Parquet, ``.npy``/``.npz`` arrays, image folders, or a dataset or
data config genmem knows; everything `genmem evaluate` measures without a model is measured
through the same library code, into one MLflow run in ``genmem/audit``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from genmem.config import MetricsConfig, tracked
from genmem.data import ArrayDataset
from genmem.data.errors import DataError
from genmem.data.inputs import align, read_input
from genmem.distributed.images import decoder
from genmem.distributed.neighbours import neighbour_search
from genmem.evaluation import check_metrics, evaluate_samples, feature_names, min_samples
from genmem.jobs.base import COMMANDS, Context, Job
from genmem.metrics.outliers import range_warning
from genmem.report import Point
from genmem.runs.evaluations import COLUMNS, log_evaluation
from genmem.storage import storage_root
from genmem.tracking import RunView, check_reachable, job_run

NO_HELDOUT = ("no held-out set was given (or it has under 2 rows), so memorisation is not contrasted with data the model never saw "
              "(a split of the training set would not be held out from the model's training): pass --heldout")


class AuditConfig(MetricsConfig):
    """What `genmem audit` reads and how it reads images; the rest is how samples are measured."""

    samples: str  # the generator's samples
    train: str  # what the generator was trained on
    heldout: str | None = None  # data from the same source the generator never saw: the contrast
    image_size: tuple[int, int] | None = None  # image folders: resize every image to H x W (bicubic)
    image_mode: Literal["auto", "L", "RGB"] = "auto"  # image folders: auto = one channel where all are grey
    rescale: bool = False  # map each image set from its own range ([0, 1], [0, 255]) to [-1, 1]
    files_per_task: int = Field(5000, gt=0)  # image folders with more files decode on Ray tasks of this many
    name: str | None = None  # the MLflow run's name (default: from the samples' and training set's hashes)

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        if isinstance(value, int) or (isinstance(value, (list, tuple)) and len(value) == 1):
            side = value if isinstance(value, int) else value[0]
            return (side, side)
        return value

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"image_size must be positive, got {value}")
        return value


def read_sets(cfg: AuditConfig) -> dict[str, ArrayDataset]:
    """The samples, the training set and (where given) the held-out set, read and checked against
    each other, before any tracking or metric work."""
    options = {"size": cfg.image_size, "mode": cfg.image_mode, "decode": decoder(cfg.files_per_task)}
    sets = {"samples": read_input(cfg.samples, role="samples", **options),
            "training set": read_input(cfg.train, role="train", **options)}
    if cfg.heldout:
        sets["held-out set"] = read_input(cfg.heldout, role="heldout", **options)
    sets = align(sets, rescale=cfg.rescale)
    need = min_samples(cfg)
    for name, ds in sets.items():
        if len(ds) < need and name != "held-out set":
            raise DataError(f"{len(ds)} rows in the {name} are too few for the k-NN metrics (k up to {need - 1}): "
                            f"give at least {need}, or lower lid_k")
    train = sets["training set"]
    check_metrics(cfg, train, sets.get("held-out set", train.take(torch.arange(0))))
    return sets


def run(cfg: AuditConfig, ctx: Context) -> dict[str, Any]:
    sets = read_sets(cfg)
    check_reachable()
    samples, train = sets["samples"], sets["training set"]
    heldout = sets.get("held-out set", train.take(torch.arange(0)))
    tags = {"samples": cfg.samples, "train": cfg.train, "heldout": cfg.heldout or "none",
            "samples_sha256": samples.manifest.sha256, "train_sha256": train.manifest.sha256,
            "features": ",".join(feature_names(cfg.features, train)), **ctx.tags}
    name = cfg.name or f"audit-{samples.manifest.sha256[:8]}-{train.manifest.sha256[:8]}"
    contrast = len(heldout) >= 2  # a named held-out split may be empty (heldout_fraction: 0)
    if not contrast:
        print(f"[genmem audit] {NO_HELDOUT}", file=sys.stderr, flush=True)
    # Measured first, recorded after: the work starts before MLflow's import and store (3-4 s on
    # 2 cores), and a measurement that fails records no run.
    result = evaluate_samples(samples, train, heldout, cfg, cache_dir=storage_root() / "features", search=neighbour_search(cfg, len(train)))
    warning = range_warning(result.metrics["eval/out_of_range_fraction"], float(train.x.min()), float(train.x.max()))
    if warning:
        print(f"[genmem audit] {warning}", file=sys.stderr, flush=True)
    with job_run("audit", name, params=tracked(cfg), tags=tags, parent_run_id=ctx.parent_run_id, columns=COLUMNS,
                 key=ctx.key) as tracker:
        if not contrast:
            tracker.tags({"heldout_contrast": NO_HELDOUT})
        log_evaluation(tracker, result, cfg)
    metrics = {k.removeprefix("eval/"): v for k, v in result.metrics.items()}
    return {"mlflow_run_id": tracker.run_id, "samples": len(samples), "train": len(train), "heldout": len(heldout),
            "heldout_contrast": "yes" if contrast else NO_HELDOUT, **metrics,
            "most_memorised": result.most_memorised[:3]}


COPY_TESTS = (("memorised_fraction", "memorised (d1/d2 < 1/3)"), ("authpct", "authentic % (Alaa et al.)"),
              ("ct", "C_T (< 0 copies, > 0 underfits)"), ("zu", "Z_U, all cells"), ("gap", "held-out gap, size-matched"))


def table(result: dict[str, Any]) -> str:
    """The copy tests beside the null control (held-out data measured as samples), then quality."""
    keys = ["d1_q50", "fd_classifier", "fd_classifier_heldout", "fd_pixels", "fd_pixels_heldout", "fid", "precision", "recall",
            "density", "coverage", "lid_mle", "lid_twonn"]
    lines = [f"audit of {result['samples']} samples against {result['train']} training rows"
             + (f" and {result['heldout']} held-out rows" if result["heldout"] else " (no held-out set)"),
             f"  {'':<34}{'samples':>26}{'null control':>26}"]
    for key, label in COPY_TESTS:
        if key in result:
            lines.append(f"  {label:<34}{_with_interval(result, key):>26}{_with_interval(result, 'null/' + key):>26}")
    lines += [f"  {k:<34}{_with_interval(result, k):>26}" for k in keys if k in result]
    for row in result["most_memorised"]:
        where = row.get("path", f"row {row['sample_row']}")
        lines.append(f"  most memorised: {where} -> training {row.get('train_path', row['train_index'])} (d1/d2 {row['ratio']:.3f})")
    return "\n".join(lines)


def _with_interval(result: dict[str, Any], key: str) -> str:
    """``value [lo, hi]`` where the interval was measured, ``value`` alone, or "-" where not measured."""
    if key not in result:
        return "-"
    text = f"{result[key]:.4g}"
    return f"{text} [{result[key + '_lo']:.3g}, {result[key + '_hi']:.3g}]" if key + "_lo" in result else text


def report_points(run: RunView) -> list[Point]:
    """The audited samples: one point, named by the samples' location."""
    where = run.tags.get("samples", "?")
    p = run.point(run.metrics, "eval/", method="audit", setting=Path(where.rstrip("/")).name or where,
                  model=run.tags.get("samples_sha256", "")[:11])
    return [p] if p else []


JOB = Job(
    command=COMMANDS["audit"],
    config=AuditConfig,
    run=run,
    table=table,
    report_points=report_points,
)

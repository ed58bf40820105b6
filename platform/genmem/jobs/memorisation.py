"""`genmem memorisation`: memorisation and the dimension a model has learned, at one
training-set size (METHODS.md §Memorisation vs training-set size). Swept over ``data.train_size``
by Tune (``tune_spaces/training_set_size.yaml``), the sweep's parent run gets the phase plot and
the effective model memorisation (Gu et al. 2023).

The config is a training config with a ``study`` section. One run:

1. trains the model on Ray Train workers at the configured size, for a budget of fixed images
   seen (``study.budget: images``, the config's ``images``) or fixed passes over the data
   (``passes``: ``study.images_per_example`` x size, as Gu et al. scale training with the set);
2. draws ``study.n`` samples on Ray tasks and measures them as `genmem evaluate` does:
   memorised fraction against the training set and against the held-out split (the control),
   FD (to the held-out split: it does not change with the size), precision/recall, LID (MLE, TwoNN);
3. reads the learned dimension off the score Jacobian at noise variance ``study.dimension.noise``
   at ``study.dimension.points`` training points and as many held-out points (median and
   spread), and on linear-manifold data with ``per_direction`` which true tangent directions
   the model keeps, by their variance.

Usage::

    genmem memorisation --config configs/size_manifold.yaml --set data.train_size=16
    genmem sweep --space tune_spaces/training_set_size.yaml --job memorisation --config configs/size_digits.yaml
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from genmem.checkpoint import load_checkpoint
from genmem.config import MetricsConfig, Strict, TrainConfig, to_yaml, tracked
from genmem.data import ArrayDataset, load_dataset
from genmem.data.shards import read_shards
from genmem.distributed.neighbours import neighbour_search
from genmem.distributed.sampling import sample_once
from genmem.errors import ConfigError
from genmem.evaluation import evaluate_samples, primary_fd
from genmem.generative import build_process, derive_seed
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.metrics.dimension import DimensionReport, learned_dimension, tangent_kept
from genmem.metrics.flipd import convolution_score
from genmem.metrics.memorisation import effective_memorisation
from genmem.report import SIZE_METHOD, Point
from genmem.runs import headlines
from genmem.runs.curves import grouped
from genmem.runs.evaluations import log_evaluation
from genmem.runs.training import footprint, train_model
from genmem.runs.training import preflight as train_preflight
from genmem.seeds import SizeStudy as Stream
from genmem.storage import ensure_writable, storage_root, uri_of
from genmem.tracking import RunView, job_run
from genmem.viz import phase_plot, spectrum_plot


class DimensionConfig(Strict):
    """Where and how the learned dimension is read."""

    noise: float = 1e-3  # variance s of the Gaussian smoothing at which the score Jacobian is read (small: near the data)
    points: int = Field(64, gt=0)  # training points, and as many held-out points
    per_direction: bool = False  # which true tangent directions are kept: linear-manifold data only

    @model_validator(mode="after")
    def _noise_in_range(self) -> "DimensionConfig":
        if not 0 < self.noise < 1:
            raise ValueError(f"study.dimension.noise must lie in (0, 1), got {self.noise}: it is the variance of the smoothing noise, small near the data")
        return self


class StudyConfig(Strict):
    budget: Literal["images", "passes"] = "images"  # fixed images seen, or fixed passes over the data
    images_per_example: int | None = Field(None, gt=0)  # budget=passes: images = this x training-set size
    n: int = Field(2000, gt=5)  # samples measured
    threshold: float = Field(0.9, gt=0, le=1)  # memorised fraction that counts for the effective model memorisation
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dimension: DimensionConfig = Field(default_factory=DimensionConfig)

    @model_validator(mode="after")
    def _budget(self) -> "StudyConfig":
        if self.budget == "passes" and self.images_per_example is None:
            raise ValueError("study.budget=passes needs study.images_per_example (images seen per training example)")
        return self


class MemorisationConfig(TrainConfig):
    """A training config (the model, data with ``data.train_size``, budget) plus the study."""

    name: str = Field("memorisation", pattern=r"^[A-Za-z0-9_.-]+$")
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _size(self) -> "MemorisationConfig":
        if self.data.train_size is not None and self.data.train_size < 3:
            raise ValueError(f"data.train_size is {self.data.train_size}: the memorisation test compares each sample's first "
                             "and second nearest training points, so it needs at least 3")
        return self


def training_config(cfg: MemorisationConfig, size: int, run_name: str) -> TrainConfig:
    """The training run: the config without its study, its budget fixed by ``study.budget``."""
    tree = cfg.model_dump(mode="json", exclude={"study"})
    tree.update(name=f"{cfg.name}-train", run_name=f"{run_name}-train")
    if cfg.study.budget == "passes":
        tree["images"] = cfg.study.images_per_example * size
    return TrainConfig.model_validate(tree)


def _checked(cfg: MemorisationConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """Tracking, storage, the data at its size and the per-direction report's needs, before any Ray work."""
    train_preflight(training_config(cfg, 1, "check"))
    train, heldout = load_dataset(cfg.data)  # a size beyond the split fails here, naming both
    if cfg.study.dimension.per_direction and "F" not in train.manifest.extra:
        raise ConfigError(f"study.dimension.per_direction needs linear-manifold data with known directions (data.source=manifold), "
                          f"but data.source={cfg.data.source} has none: set it to false")
    if len(heldout) < 2:
        raise ConfigError("the study measures copying of held-out points as its control: set data.heldout_fraction above 0")
    if cfg.study.n <= cfg.study.metrics.lid_k:
        raise ConfigError(f"study.n={cfg.study.n} samples are too few for the k-NN metrics (lid_k={cfg.study.metrics.lid_k}): raise study.n")
    return train, heldout


def _whole_split(cfg: MemorisationConfig) -> ArrayDataset:
    """The whole training split: what the classifier features are fitted on at every size, so
    FD is measured in one feature space across the sweep (a classifier fitted on a 16-point
    subset would make FD at 16 points incomparable with FD at 512)."""
    return load_dataset(cfg.data.model_copy(update={"train_size": None}))[0]


def preflight(cfg: MemorisationConfig) -> None:
    _checked(cfg)


def _points(ds: ArrayDataset, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ds.x[torch.randperm(len(ds), generator=g)[: min(k, len(ds))]].float()


def dimension_study(cfg: MemorisationConfig, checkpoint: str, train: ArrayDataset, heldout: ArrayDataset
                    ) -> tuple[dict[str, float], dict[str, DimensionReport]]:
    """The learned dimension at training and held-out points (``learned_dim/<where>_q50`` ...), and with
    ``per_direction`` the fraction of points keeping each true tangent direction
    (``learned_dim/<where>_kept_<i>``, i in decreasing order of variance)."""
    loaded = load_checkpoint(checkpoint)
    dc = cfg.study.dimension
    score = convolution_score(loaded.model.eval(), build_process(loaded.config.process), dc.noise)
    dim = int(np.prod(train.shape))
    chunk = max(1, 4096 // dim)  # chunk x D rows go through the network at once
    reports = {where: learned_dimension(score, _points(ds, dc.points, derive_seed(cfg.seed, Stream.POINTS, i)), dc.noise, chunk=chunk)
               for i, (where, ds) in enumerate((("train", train), ("heldout", heldout)))}
    metrics: dict[str, float] = {}
    for where, rep in reports.items():
        metrics.update({f"learned_dim/{k}": v for k, v in rep.summary(where).items()})
    if dc.per_direction:
        extra = train.manifest.extra
        order = np.argsort(extra["variances"])[::-1]  # largest variance first
        tangent = torch.tensor(extra["F"], dtype=torch.float64)[:, order.copy()]
        metrics["learned_dim/true"] = float(len(order))
        for where, rep in reports.items():
            kept = tangent_kept(rep.jacobians, tangent, dc.noise).double().mean(0)
            metrics.update({f"learned_dim/{where}_kept_{i}": float(v) for i, v in enumerate(kept)})
    return metrics, reports


# the run list's: one size per row
COLUMNS = ("params.train_points", "eval/memorised_fraction", "eval/heldout_memorised_fraction", "memorisation/fd", "learned_dim/train_q50",
           "eval/lid_mle")


def run(cfg: MemorisationConfig, ctx: Context) -> dict[str, Any]:
    train, heldout = _checked(cfg)
    run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    root = ensure_writable(storage_root() / "memorisation" / run_name)
    size = len(train)
    train_cfg = training_config(cfg, size, run_name)
    params = {**tracked(cfg), "train_points": size, "images_budget": train_cfg.images}
    # Named in MLflow by what it is (the storage folder and the resume key keep run_name).
    with job_run("memorisation", f"size-{cfg.data.source}-n{size}", params=params, tags={"study_run": run_name, **ctx.tags},
                 parent_run_id=ctx.parent_run_id, columns=COLUMNS, key=run_name if (cfg.run_name or ctx.key) else None) as tracker:
        tracker.text(to_yaml(cfg), "memorisation.yaml")
        print(f"[genmem memorisation] {size} training points, {train_cfg.images} images of training", flush=True)
        trained = train_model(train_cfg, Context(parent_run_id=tracker.run_id, tags={"memorisation": run_name}), kind="memorisation")
        sample_once(trained["checkpoint"], cfg.study.n, root / "samples", seed=derive_seed(cfg.seed, Stream.SAMPLE), scaling=cfg.scaling)
        result = evaluate_samples(read_shards(root / "samples"), train, heldout, cfg.study.metrics, cache_dir=storage_root() / "features",
                                  search=neighbour_search(cfg.study.metrics, len(train)), feature_data=_whole_split(cfg))
        log_evaluation(tracker, result, cfg.study.metrics)
        print(f"[genmem memorisation] learned dimension at {cfg.study.dimension.points} training and held-out points", flush=True)
        dims, reports = dimension_study(cfg, trained["checkpoint"], train, heldout)
        tracker.metrics(dims)
        tracker.image("score_spectrum", spectrum_plot({where: rep.scaled_spectrum for where, rep in reports.items()}, cfg.study.dimension.noise))
        metrics = {k.removeprefix("eval/"): v for k, v in result.metrics.items()} | {k.removeprefix("learned_dim/"): v for k, v in dims.items()}
        metrics["fd"] = result.metrics[primary_fd(result.metrics) + "_heldout"]
        metrics.update(train_size=float(size), images=float(train_cfg.images), emm_threshold=cfg.study.threshold)
        tracker.metrics({"memorisation/fd": metrics["fd"], "memorisation/train_size": float(size)})
        tracker.describe(headlines.size_study(size, {**result.metrics, **dims, "fd": metrics["fd"]}))
        tracker.tags({"checkpoint_uri": str(trained["checkpoint"]), "train_run_id": trained["mlflow_run_id"]})
    return {"run_name": run_name, "mlflow_run_id": tracker.run_id, "checkpoint": trained["checkpoint"], "train_size": size,
            "images": train_cfg.images, "samples": uri_of(root / "samples"), "train_run_id": trained["mlflow_run_id"], "metrics": metrics}


_TABLE = (("memorised", "memorised_fraction"), ("held-out", "heldout_memorised_fraction"), ("authentic %", "authpct"),
          ("C_T", "ct"), ("FD", "fd"), ("precision", "precision"),
          ("recall", "recall"), ("dim (train)", "train_q50"), ("dim (held-out)", "heldout_q50"), ("LID MLE", "lid_mle"),
          ("LID TwoNN", "lid_twonn"))


def format_table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    lines = [f"{result['train_size']} training points, {result['images']} images of training"]
    lines += [f"{title:<16}{m[key]:>10.4g}" for title, key in _TABLE if key in m]
    kept = sorted(k for k in m if k.startswith("train_kept_"))
    if kept:
        lines.append("tangent directions kept at training points, largest variance first: "
                     + " ".join(f"{m[k]:.2f}" for k in kept))
    return "\n".join(lines)


_PHASE = {"memorised fraction": "memorised_fraction", "authentic % (lower: copies)": "authpct", "FD to the held-out data": "fd",
          "learned dimension (median, training points)": "train_q50"}


def _by_size(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """One line per seed of ``key`` against training-set size, and their mean."""
    lines: dict[str, dict[float, float]] = {}
    for row in rows:
        final = row["reports"][-1] if row["reports"] else {}
        if key in final and "train_size" in final:
            seed = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(row["params"].items()) if k.split(".")[-1] == "seed")
            lines.setdefault(seed or "run", {})[final["train_size"]] = final[key]
    out = {label: (sorted(pts), [pts[x] for x in sorted(pts)]) for label, pts in lines.items()}
    sizes = sorted({x for pts in lines.values() for x in pts})
    if len(lines) > 1:
        out["mean"] = (sizes, [float(np.mean([pts[x] for pts in lines.values() if x in pts])) for x in sizes])
    return out


def sweep_metrics(space, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Effective model memorisation per group of other swept values (one group: ``emm``)."""
    out = {}
    for label, group in grouped(space, rows, exclude=("data.train_size",)).items():
        lines = _by_size(group, "memorised_fraction")
        xs, ys = lines.get("mean", next(iter(lines.values()), ([], [])))
        thresholds = [r["reports"][-1].get("emm_threshold") for r in group if r["reports"]]
        if xs and thresholds and thresholds[0] is not None:
            emm = effective_memorisation(xs, ys, thresholds[0])
            key = "emm" + ("/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label) if label else "")  # MLflow's key characters
            out[key] = float("nan") if emm is None else emm
    return out


def sweep_figure(space, rows: list[dict[str, Any]]):
    """The phase plot: each measure against training-set size (log x), one line per seed and
    their mean; the memorised-fraction panel marks the threshold and the effective model
    memorisation."""
    group = next(iter(grouped(space, rows, exclude=("data.train_size",)).values()), [])
    panels = {title: _by_size(group, key) for title, key in _PHASE.items()}
    panels = {title: lines for title, lines in panels.items() if lines}
    if not panels:
        return None
    threshold = next((r["reports"][-1].get("emm_threshold") for r in group if r["reports"]), None)
    emm = sweep_metrics(space, group).get("emm")
    return phase_plot(panels, "training-set size", threshold=threshold, emm=emm)


REPORTS = ("memorised_fraction", "heldout_memorised_fraction", "authpct", "fd", "precision", "recall", "lid_mle", "lid_twonn", "train_q50",
           "heldout_q50", "train_size", "images", "emm_threshold")

def report_points(run: RunView) -> list[Point]:
    """The study's samples at its training-set size (its inner training run holds no point)."""
    if "memorisation/train_size" not in run.metrics:
        return []
    p = run.point(run.metrics, "eval/", method=SIZE_METHOD, setting=f"n={run.metrics['memorisation/train_size']:g}",
                  model=run.run_name)
    return [p] if p else []


JOB = Job(
    command=COMMANDS["memorisation"],
    config=MemorisationConfig,
    run=run,
    footprint=lambda cfg: footprint(cfg),
    preflight=preflight,
    metrics=REPORTS,
    final_report=lambda r: numeric(r["metrics"]),
    table=format_table,
    sweep_figure=sweep_figure,
    report_points=report_points,
    sweep_metrics=sweep_metrics,
)

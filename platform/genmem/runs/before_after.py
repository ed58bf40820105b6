"""The scaffold of a job that changes a base model (unlearn, finetune): check the base and its
data, sample the base, train with the job's objective, draw the same samples from the changed
model, measure both, log, and read the run back as report points. A job supplies only what is
its own: its config, its objective, its :class:`Measure` and its figures.

Usage::

    base = check_base(cfg.base, cfg.batch_size, cfg.scaling)
    with BeforeAfter.open("unlearn", cfg, ctx) as change:
        before = change.samples(cfg.base, cfg.eval_n, "before", seed)
        trained = change.train(train_cfg, objective_factory=factory)
        after = change.samples(trained["checkpoint"], cfg.eval_n, "after", seed)
        metrics = change.measure(measure, before, after, trained["checkpoint"])
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel

from genmem.checkpoint import read_meta
from genmem.config import ScalingConfig, TrainConfig, to_yaml, tracked
from genmem.data import ArrayDataset
from genmem.distributed.sampling import sample_once
from genmem.errors import ConfigError
from genmem.evaluation import training_data
from genmem.report import QUALITY_KEYS, Point
from genmem.runs import headlines
from genmem.runs.context import Context
from genmem.runs.training import TrainJobResult, derived_tree, train_model
from genmem.storage import check_storage, ensure_writable, storage_root, storage_uri, uri_of
from genmem.tracking import RunView, Tracker, check_reachable, job_run, numeric

__all__ = ["Base", "BeforeAfter", "Measure", "check_base", "format_table", "report_points", "reported"]


BEFORE, AFTER = 0, 1  # the steps of a measured metric: the base model's samples, the changed model's


@dataclass(frozen=True)
class Base:
    """A checked base checkpoint: where it is, its saved meta, and the data it was trained on."""

    uri: str
    meta: dict[str, Any]
    train: ArrayDataset
    heldout: ArrayDataset


def check_base(uri: str, batch_size: int, scaling: ScalingConfig) -> Base:
    """Tracking, storage, the base checkpoint and its data, and the batch's split over the
    workers, before any Ray work (one sentence each)."""
    check_reachable()
    check_storage(storage_uri())
    meta = read_meta(uri)  # a clear error for a missing or foreign folder
    _, train, heldout = training_data(uri)
    if tuple(meta["shape"]) != tuple(train.shape):
        raise ConfigError(f"base checkpoint {uri} generates shape {tuple(meta['shape'])} but its data has shape {train.shape}")
    if batch_size % scaling.ranks:
        raise ConfigError(f"batch_size {batch_size} must be divisible by scaling.num_workers {scaling.num_workers}")
    return Base(uri, meta, train, heldout)


class Measure(Protocol):
    """What a job measures on the base's samples and the changed model's. ``names``: what
    ``__call__`` returns for one set of samples, reported as ``<name>_before`` and ``<name>``;
    ``compared``: what ``compare`` returns about the change itself, reported once (a name
    ending in ``/`` is a family: ``retention/`` covers ``retention/<label>``). The job's reported
    metric names are derived from these (:func:`reported`), and a measure that returns a name it
    did not declare is refused. ``headline``: the names whose before → after make the run's
    description, in that order (a compared ``x`` with its ``x_before`` counts too)."""

    names: ClassVar[tuple[str, ...]]
    compared: ClassVar[tuple[str, ...]]
    headline: ClassVar[tuple[str, ...]]

    def __call__(self, x: torch.Tensor) -> dict[str, float]: ...

    def compare(self, before: torch.Tensor, after: torch.Tensor, checkpoint: str) -> dict[str, float]: ...


def reported(measure: type[Measure], *settings: str) -> tuple[str, ...]:
    """The metric names a job's Tune reports carry: each measure before and after, each
    comparison, and the job's own settings (e.g. ``lam``)."""
    pairs = tuple(n for name in measure.names for n in (name, f"{name}_before"))
    return pairs + tuple(c for c in measure.compared if not c.endswith("/")) + settings


def _declared(values: dict[str, float], declared: tuple[str, ...], measure: Measure) -> dict[str, float]:
    unknown = [k for k in values if k not in declared and not any(d.endswith("/") and k.startswith(d) for d in declared)]
    if unknown:
        raise RuntimeError(f"{type(measure).__name__} returned {unknown}, which it does not declare: add them to its names or compared")
    return values


@dataclass
class BeforeAfter:
    """One run of a job that changes a base model: its name, its folder under the storage root
    (samples as Parquet with provenance) and its MLflow run. :meth:`open` starts it."""

    kind: str
    run_name: str
    root: Path
    tracker: Tracker
    scaling: ScalingConfig

    @classmethod
    @contextmanager
    def open(cls, kind: str, cfg: BaseModel, ctx: Context, columns: tuple[str, ...] = ()) -> Iterator["BeforeAfter"]:
        """The run of experiment ``genmem/<kind>`` for ``cfg`` (which has ``name``, ``run_name``,
        ``base`` and ``scaling``): named by ``cfg.run_name``, else the context's key (a restored
        trial reopens its run), else a fresh name; the config saved as ``<kind>.yaml``;
        ``columns``: what the experiment's run list shows."""
        run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        root = ensure_writable(storage_root() / kind / run_name)
        with job_run(kind, run_name, params=tracked(cfg), tags={"base_checkpoint": str(cfg.base), **ctx.tags},
                     parent_run_id=ctx.parent_run_id, key=run_name if (cfg.run_name or ctx.key) else None, columns=columns) as tracker:
            tracker.text(to_yaml(cfg), f"{kind}.yaml")
            yield cls(kind, run_name, root, tracker, cfg.scaling)

    def samples(self, checkpoint: str, n: int, name: str, seed: int) -> torch.Tensor:
        """``n`` samples of ``checkpoint`` from Ray sampling tasks, kept under ``<run>/<name>``."""
        return sample_once(checkpoint, n, self.root / name, seed=seed, scaling=self.scaling)

    def uri(self, name: str) -> str:
        return uri_of(self.root / name)

    def train_config(self, base: Base, cfg: BaseModel, data: dict[str, Any] | None = None, images: int | None = None,
                     **changes: Any) -> TrainConfig:
        """The training run that changes the base: the base's saved config with this job's
        budget (``images``, default ``cfg.images``), batch, learning rate, seed and workers, named
        after this run, its data section updated by ``data`` and its other keys by ``changes`` (a
        key given as None keeps the derived value)."""
        tree = derived_tree(base.meta["config"], name=f"{cfg.name}-train", run_name=f"{self.run_name}-train", seed=cfg.seed,
                            images=cfg.images if images is None else images, batch_size=cfg.batch_size, lr=cfg.lr, scaling=cfg.scaling)
        tree["data"] = {**tree["data"], **(data or {})}
        tree.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.model_validate(tree)

    def train(self, cfg: TrainConfig, **factories: Any) -> TrainJobResult:
        """Train on Ray workers under a child MLflow run of this one (experiment ``genmem/<kind>``)."""
        return train_model(cfg, Context(parent_run_id=self.tracker.run_id, tags={self.kind: self.run_name}), kind=self.kind, **factories)

    def measure(self, measure: Measure, before: torch.Tensor, after: torch.Tensor, checkpoint: str, note: str = "") -> dict[str, float]:
        """``<name>_before`` and ``<name>`` for each of the measure's names, and its comparisons.
        In MLflow each is one key, ``<kind>/<name>``, at step :data:`BEFORE` (the base's samples)
        and :data:`AFTER` (the changed model's): one chart per measure shows the change, and
        trials of a sweep compare on the same keys. ``note``: a clause the run's description ends with."""
        b = _declared(measure(before), measure.names, measure)
        a = _declared(measure(after), measure.names, measure)
        c = _declared(measure.compare(before, after, checkpoint), measure.compared, measure)
        metrics = {**{f"{k}_before": v for k, v in b.items()}, **a, **c}
        values = numeric(metrics)
        paired = {k for k in values if f"{k}_before" in values}
        self.tracker.metrics({f"{self.kind}/{k}": values[f"{k}_before"] for k in paired}, step=BEFORE)
        self.tracker.metrics({f"{self.kind}/{k}": v for k, v in values.items() if k.removesuffix("_before") not in paired or k in paired},
                             step=AFTER)
        self.tracker.describe(f"{self.kind}: " + headlines.change(metrics, measure.headline)
                              + f" (charts: step {BEFORE} the base model, step {AFTER} after {self.kind})" + (f"; {note}" if note else ""))
        return metrics

    def finish(self, trained: TrainJobResult) -> None:
        self.tracker.tags({"checkpoint_uri": str(trained["checkpoint"]), "train_run_id": trained["mlflow_run_id"]})


def format_table(metrics: dict[str, float], changed: str, footer: str) -> str:
    """The CLI's table: each measure for the base and the changed model, then what was measured
    once (the comparisons), then ``footer``."""
    names = sorted({k.removesuffix("_before") for k in metrics if k.endswith("_before")})
    paired = set(names) | {f"{k}_before" for k in names}
    lines = [f"{'':<22}{'base':>12}{changed:>12}"] + [f"{k:<22}{metrics[k + '_before']:>12.4g}{metrics[k]:>12.4g}" for k in names]
    lines += [f"{k:<22}{'':>12}{v:>12.4g}" for k, v in metrics.items() if k not in paired]
    return "\n".join([*lines, footer])


def report_points(run: RunView, kind: str, setting: str) -> list[Point]:
    """The base model's samples (its θ*, step :data:`BEFORE`) and the changed model's (step
    :data:`AFTER`), as `genmem report` points."""
    prefix = f"{kind}/"
    keys = [k for k in ("memorised_fraction", *QUALITY_KEYS, "ct", "authpct") if prefix + k in run.metrics]
    history = {k: run.history(prefix + k) for k in keys}
    # both steps or neither: a run logged before the steps existed holds no step AFTER, and no point
    before = {k: h[BEFORE] for k, h in history.items() if BEFORE in h and AFTER in h}
    after = {k: h[AFTER] for k, h in history.items() if BEFORE in h and AFTER in h}
    model = run.tags.get("base_checkpoint", "")
    points = [run.point(before, method=f"{kind} θ*", setting="base", model=model, base=True),
              run.point(after, method=kind, setting=setting, model=model)]
    return [p for p in points if p]

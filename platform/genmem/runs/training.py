"""Training on Ray Train workers under an MLflow run: what `genmem train` is, and what every job
that trains (retraining generations, unlearning, fine-tuning, the size study) trains through.

Three levels (Ray Train V2): :func:`train_fn_per_worker` runs the library's loop on every
worker; :func:`train_model` is the driver (it opens the MLflow run, then fits the workers); a
job or a Tune trial calls :func:`train_model`. Jobs bring their own objective
(``objective_factory(cfg, train) -> Objective``, picklable) and probe
(``probe_factory(cfg, train, heldout) -> probe(model, device)``, picklable; default: the
memorisation probe), run on rank 0 every ``cfg.eval_every_images``."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from genmem.checkpoint import load_checkpoint, read_meta
from genmem.config import BUDGET_TAG, ENDED_TAG, ScalingConfig, TrainConfig, to_yaml, tracked
from genmem.data import ArrayDataset, load_dataset
from genmem.distributed.cluster import Footprint, ensure_ray
from genmem.distributed.engine import AccelerateEngine
from genmem.distributed.train import (
    check_workers,
    fit_workers,
    latest_checkpoint,
    ray_storage,
    report_round,
    restored_checkpoint,
    worker_bundle,
)
from genmem.errors import CheckpointError, ConfigError, TrackingUnavailable
from genmem.evaluation import memorisation_probe
from genmem.methods.healing import Healer
from genmem.models import build_model
from genmem.runs import headlines
from genmem.runs.context import Context
from genmem.storage import check_storage, join, storage_env, storage_uri
from genmem.tracking import Tracker, check_reachable, deliver, job_run, tracking_uri
from genmem.training import Objective, resolve_sampler, train_loop

# A hook runs on every rank after each checkpoint round: hook(rank, images_seen, final).
Hook = Callable[[int, int, bool], None]
ObjectiveFactory = Callable[[TrainConfig, ArrayDataset], Objective]
Probe = Callable[[Any, Any], dict[str, float]]
ProbeFactory = Callable[[TrainConfig, ArrayDataset, ArrayDataset], Probe]


class TrainJobResult(TypedDict):
    checkpoint: str
    grid: str
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    step: int
    images_seen: int
    loss: float | None
    param_spread: float | None
    parameters: int
    num_workers: int
    memorisation_budget: str | None  # "over" (flagged), "stopped" (ended at the budget), "healed" or None
    memorisation_budget_reason: str | None
    heals: list[dict[str, Any]]  # action=heal: each heal (genmem.methods.healing.Heal) the result went through
    ended_by: str | None  # a probe with a goal (genmem.training.Goal): "target" or "max_images"; else None
    ended_by_reason: str | None


class RayReporter:
    """Training side effects on a Ray worker: MLflow writes from rank 0 only (a disabled
    Tracker elsewhere), a Ray Train report from every rank each checkpoint round and, with
    ``report_logs`` (a Tune trial: ASHA needs the progress), each log interval too; rank 0's
    probe results ride on its next report."""

    def __init__(self, tracker: Tracker, rank: int, hooks: Sequence[Hook] = (), total_images: int = 0, report_logs: bool = False,
                 backlog: list[dict[str, Any]] | None = None, tracking_wait_s: float = 300.0):
        self.tracker, self.rank, self.hooks, self.total_images = tracker, rank, list(hooks), total_images
        self.checkpoint_meta: dict[str, Any] = {"mlflow_run_id": tracker.run_id} if tracker.enabled else {}
        self.backlog = list(backlog or [])  # what a restarted run's checkpoint had not delivered
        self.tracking_wait_s = tracking_wait_s
        self.report_logs = report_logs
        self._tmp: list[str] = []
        self._pending: dict[str, float] = {}

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None:
        # MLflow's step axis is images seen: comparable across batch sizes and worker counts. The
        # optimizer step rides on the log rounds only: a probe at the same images adds no second point.
        self.tracker.metrics({**metrics, **({"train/step": step} if "train/loss" in metrics else {})}, step=images_seen)
        self.tracker.flush(0.0)  # collects what arrived and sends again what MLflow gave up on; never waits
        self._pending.update(metrics)
        if self.report_logs and "train/loss" in metrics:  # every rank logs the loss at the same steps
            report_round({**self._pending, "step": step, "images_seen": images_seen})
            self._pending.clear()
        if self.rank == 0 and "train/loss" in metrics:  # Ray forwards worker stdout to the driver
            print(f"[genmem train] {images_seen}/{self.total_images} images ({100 * images_seen / max(self.total_images, 1):.0f}%) "
                  f"loss {metrics['train/loss']:.4f}, {metrics['train/images_per_s']:.0f} images/s", flush=True)

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None:
        self.tracker.image(name, picture, step=images_seen)

    def note(self, tags: dict[str, str]) -> None:
        self.tracker.tags(tags)

    def checkpoint_path(self, images_seen: int, final: bool) -> Path:
        """Before a checkpoint is written: flush the tracking (at the end, waiting up to
        ``GENMEM_TRACKING_WAIT_S``, default 300 s) and record in it what the server has not
        confirmed, which the driver delivers (exactly once) when the server is back."""
        if self.tracker.enabled:
            unsent = self.tracker.flush(self.tracking_wait_s if final else 0.0)
            self.checkpoint_meta["tracking_backlog"] = self.backlog + unsent
        tmp = tempfile.mkdtemp(prefix="genmem-ckpt-")
        self._tmp.append(tmp)
        return Path(tmp) / "checkpoint"

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None:
        if path is not None:  # train/* is logged at its own interval; the rest (dist/*) only comes here
            self.tracker.metrics({k: v for k, v in metrics.items() if not k.startswith("train/")}, step=images_seen)
        report_round({**self._pending, **metrics, "step": step, "images_seen": images_seen}, path)
        self._pending.clear()
        for tmp in self._tmp:  # the report has persisted the checkpoint to storage
            shutil.rmtree(tmp, ignore_errors=True)
        self._tmp.clear()
        for hook in self.hooks:
            hook(self.rank, images_seen, final)


@dataclass(frozen=True)
class WorkerSpec:
    """What every training worker receives, built and checked on the driver: the config, the
    MLflow run rank 0 writes to, the Ray run's folder (resume), the hooks run after each
    checkpoint round, whether Tune takes each log interval, how long rank 0 waits for an absent
    tracking server at the end, and the objective and probe factories (None: plain training,
    the memorisation probe). Where storage and tracking are travels as the workers' environment
    (:func:`worker_env`), set by the execution layer before this reaches a worker."""

    config: TrainConfig
    run_id: str
    run_dir: str
    hooks: tuple[Hook, ...] = ()
    tune_reports: bool = False
    tracking_wait_s: float = 300.0
    objective: ObjectiveFactory | None = None
    probe: ProbeFactory | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"WorkerSpec.config must be a TrainConfig, got {type(self.config).__name__}")
        for name in ("run_id", "run_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"WorkerSpec.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.tracking_wait_s < 0:
            raise ValueError(f"WorkerSpec.tracking_wait_s must be at least 0, got {self.tracking_wait_s}")
        for fn in (*self.hooks, self.objective, self.probe):
            if fn is not None and not callable(fn):
                raise TypeError(f"WorkerSpec hooks and factories must be callable, got {fn!r}")


def worker_env() -> dict[str, str]:
    """The driver's storage variables and tracking URI, which every worker takes over whatever
    its process inherited (read on the driver)."""
    return {**storage_env(), "MLFLOW_TRACKING_URI": tracking_uri()}


def train_fn_per_worker(spec: WorkerSpec) -> None:
    cfg = spec.config
    engine = AccelerateEngine(cfg.scaling.mixed_precision)
    resume = restored_checkpoint(lambda p: load_checkpoint(p, use_ema=False, with_optimizer=True), spec.run_dir)
    init = None
    if resume is None and cfg.init_from:
        init = load_checkpoint(cfg.init_from, expect=cfg.model, use_ema=False)
    tracker = Tracker(spec.run_id, asynchronous=True) if engine.is_main else Tracker.disabled()
    train, heldout = load_dataset(cfg.data)
    cfg = resolve_sampler(cfg, train)  # the probe samples as the checkpoint will record
    total = -(-cfg.images // cfg.batch_size) * cfg.batch_size
    reporter = RayReporter(tracker, engine.rank, spec.hooks, total_images=total, report_logs=spec.tune_reports,
                           backlog=resume.meta.get("tracking_backlog") if resume is not None else None,
                           tracking_wait_s=spec.tracking_wait_s)
    probe = (spec.probe or memorisation_probe)(cfg, train, heldout) if cfg.eval_every_images and engine.is_main else None
    objective = spec.objective(cfg, train) if spec.objective is not None else None
    healer = None
    if cfg.memorisation_budget is not None and cfg.memorisation_budget.action == "heal":
        healer = Healer(cfg, train, heldout, history=resume.meta.get("heals") if resume is not None else None)
    train_loop(cfg, train, reporter, objective=objective, engine=engine, resume=resume, init=init, probe=probe, heal=healer)


def preflight(cfg: TrainConfig) -> None:
    """Everything that can be checked before Ray work starts: tracking, storage, data, the
    network for the data's shape, init_from."""
    check_reachable()
    check_storage(storage_uri())
    check_storage(ray_storage(), "GENMEM_RAY_STORAGE")
    train, _ = load_dataset(cfg.data)  # materialises once, and fails here on bad data
    build_model(cfg.model, tuple(train.shape))  # e.g. a U-Net asked for 2-D points: refused here, not on every worker
    if cfg.init_from:
        init = read_meta(cfg.init_from)  # a clear error for a missing or foreign folder
        if tuple(init["shape"]) != train.shape:
            raise CheckpointError(
                f"init_from checkpoint {cfg.init_from} generates shape {tuple(init['shape'])} but the data has shape {train.shape}: "
                "fine-tune a model trained on data of this shape"
            )
        load_checkpoint(cfg.init_from, expect=cfg.model)  # refuses another architecture, naming the key


def derived_tree(saved: dict[str, Any], *, name: str, run_name: str, seed: int, images: int, batch_size: int, lr: float,
                 scaling: ScalingConfig) -> dict[str, Any]:
    """The config tree of a short run derived from a checkpoint's saved config (unlearning,
    fine-tuning): its model, process, sampler and data with this run's budget, learning rate and
    workers; no probes, memorisation budget, periodic grids or checkpoints; the EMA half-life and the warm-up at most a
    tenth of the budget, so the EMA follows within it."""
    tree = TrainConfig.from_saved(saved).model_dump(mode="json")
    tree.update(name=name, run_name=run_name, seed=seed, images=images, batch_size=batch_size, eval_every_images=0,
                checkpoint_every_images=0, grid_every_images=0, log_every_images=max(images // 20, batch_size), memorisation_budget=None,
                scaling=scaling.model_dump(), init_from=None, source_checkpoint=None)
    tree["ema_halflife_images"] = min(tree["ema_halflife_images"], images // 10)
    tree["optim"] = {**tree["optim"], "lr": lr, "warmup_images": min(tree["optim"].get("warmup_images", 0), images // 10)}
    return tree


def train_model(cfg: TrainConfig, ctx: Context | None = None, *, kind: str = "train", hooks: Sequence[Hook] = (),
                objective_factory: ObjectiveFactory | None = None, probe_factory: ProbeFactory | None = None,
                columns: Sequence[str] = (), announce: bool = True) -> TrainJobResult:
    """Train on Ray workers under an MLflow run of experiment ``genmem/<kind>`` (``columns``: what
    its run list shows, where this run's job owns the experiment; ``announce``: print the goal's
    verdict, which a job that trains in parts says itself).

    The Ray run name is ``cfg.run_name``, else the context's key, else a fresh unique name; a
    named run that exists resumes from its last checkpoint and reopens its MLflow run."""
    ctx = ctx or Context()
    preflight(cfg)
    if objective_factory is not None and cfg.memorisation_budget is not None and cfg.memorisation_budget.action == "heal":
        raise ConfigError(f"memorisation_budget.action=heal unlearns with the process's own loss, and {kind} trains its own objective: "
                          "use action=stop or action=flag")
    if cfg.scaling.num_workers > 0:  # num_workers=0 trains in this process, with no cluster to start
        ensure_ray()
        check_workers(cfg.scaling)  # before the MLflow run opens: nothing is recorded for a refused request
    run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    named = bool(cfg.run_name or ctx.key)
    previous = latest_checkpoint(join(ray_storage(), run_name)) if named else None
    run_id = read_meta(previous).get("mlflow_run_id") if previous else None
    if run_id:  # a rerun after the server went away: first what the last run could not deliver
        _deliver(run_id, read_meta(previous), previous, run_name)
    with job_run(kind, run_name, params=tracked(cfg), tags={"ray_run_name": run_name, **ctx.tags},
                 parent_run_id=ctx.parent_run_id, columns=columns, key=run_name if named else None, run_id=run_id) as tracker:
        if not run_id:
            tracker.text(to_yaml(cfg), "config.yaml")
        spec = WorkerSpec(config=cfg, run_id=tracker.run_id, run_dir=join(ray_storage(), run_name), hooks=tuple(hooks),
                          tune_reports=ctx.under_tune, tracking_wait_s=tracking_wait_s(), objective=objective_factory, probe=probe_factory)
        fitted = fit_workers(train_fn_per_worker, spec, cfg.scaling, run_name, env=worker_env(), report_to_tune=ctx.under_tune)
        _deliver(tracker.run_id, read_meta(fitted.checkpoint), fitted.checkpoint, run_name)
        tracker.tags({"checkpoint_uri": str(fitted.checkpoint), "ray_storage": str(fitted.run_dir)})
        verdict = tracker.read_tags()
        meta = read_meta(fitted.checkpoint)
        probes = tracker.history("eval/memorised_fraction")
        tracker.describe(headlines.training(meta["images_seen"], meta["step"], fitted.metrics.get("train/loss"),
                                            (probes[0][-1], probes[1][-1]) if probes[0] else None, verdict.get(BUDGET_TAG)))
    if verdict.get(BUDGET_TAG):
        print(f"[genmem train] memorisation budget {verdict[BUDGET_TAG]}: {verdict.get(BUDGET_TAG + '_reason', '')}", flush=True)
    if verdict.get(ENDED_TAG) and announce:
        print(f"[genmem {kind}] ended by {verdict[ENDED_TAG]}: the goal was {verdict.get(ENDED_TAG + '_reason', '')}", flush=True)
    return TrainJobResult(
        checkpoint=fitted.checkpoint, grid=join(fitted.checkpoint, "samples.png"), run_name=run_name,
        mlflow_run_id=tracker.run_id, tracking_uri=tracking_uri(), step=meta["step"], images_seen=meta["images_seen"],
        loss=fitted.metrics.get("train/loss"), param_spread=fitted.metrics.get("dist/param_spread"),
        parameters=meta["parameters"], num_workers=cfg.scaling.num_workers,
        memorisation_budget=verdict.get(BUDGET_TAG), memorisation_budget_reason=verdict.get(BUDGET_TAG + "_reason"),
        heals=meta.get("heals", []), ended_by=verdict.get(ENDED_TAG), ended_by_reason=verdict.get(ENDED_TAG + "_reason"),
    )


def tracking_wait_s() -> float:
    """How long rank 0 waits at the end of training for a tracking server that went away
    (``GENMEM_TRACKING_WAIT_S``, default 300 s), read on the driver."""
    return float(os.environ.get("GENMEM_TRACKING_WAIT_S", "300"))


def _deliver(run_id: str, meta: dict[str, Any], checkpoint: str, run_name: str) -> None:
    """The metrics a checkpoint records as undelivered, sent now; while the server is still
    away, one sentence naming it and how to complete the run."""
    backlog = meta.get("tracking_backlog") or []
    try:
        deliver(run_id, backlog)
    except TrackingUnavailable:
        values = sum(len(b["metrics"]) + len(b["tags"]) for b in backlog)
        raise TrackingUnavailable(f"the MLflow tracking server {tracking_uri()} is still away after training: {values} values of run {run_id} "
                                  f"are unsent, the checkpoint {checkpoint} is intact, and rerunning with run_name={run_name} once the "
                                  "server is back completes the run") from None


def footprint(cfg: TrainConfig, driver_cpus: float = 0.1) -> Footprint:
    """A trial's driver and its worker group. In local mode (num_workers=0) the driver trains
    itself: it counts one worker's share, which Ray does not reserve for it (as a worker group's
    is free while the driver samples), so trials side by side do not overfill the cluster."""
    s = cfg.scaling
    return Footprint({"CPU": driver_cpus}, worker_bundle(s), s.ranks, s.placement_strategy, s.check_resources)

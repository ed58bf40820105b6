"""Training on Ray Train workers. Three levels (Ray Train V2): ``train_fn_per_worker`` runs the
library's loop on every worker; ``fit`` is the driver that builds and fits a ``TorchTrainer``;
Tune trials call ``fit`` from their own driver function."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genmem.checkpoint import CheckpointError, load_checkpoint, read_meta
from genmem.config import TrainConfig, to_yaml
from genmem.data import load_dataset
from genmem.distributed.cluster import check_placeable, ensure_ray
from genmem.distributed.engine import AccelerateEngine
from genmem.storage import ensure_writable, storage_root
from genmem.tracking import Tracker, check_reachable, tracking_uri
from genmem.training import train_loop

# A hook runs on every rank after each checkpoint round: hook(rank, images_seen, final).
Hook = Callable[[int, int, bool], None]


def ray_storage() -> Path:
    """Where Ray Train keeps run state and checkpoints: shared storage on a cluster."""
    return Path(os.environ.get("GENMEM_RAY_STORAGE", str(storage_root() / "ray"))).absolute()


class RayReporter:
    """Training side effects on a Ray worker: MLflow writes from rank 0 only (a disabled
    Tracker elsewhere), ``ray.train.report`` from every rank each checkpoint round."""

    def __init__(self, tracker: Tracker, rank: int, hooks: Sequence[Hook] = (), total_images: int = 0):
        self.tracker = tracker
        self.total_images = total_images
        self.rank = rank
        self.hooks = list(hooks)
        self.checkpoint_meta: dict[str, Any] = {"mlflow_run_id": tracker.run_id} if tracker.enabled else {}
        self._tmp: list[str] = []

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None:
        # MLflow's step axis is images seen: comparable across batch sizes and worker counts.
        self.tracker.metrics({**metrics, "train/step": step}, step=images_seen)
        if self.rank == 0 and "train/loss" in metrics:  # Ray forwards worker stdout to the driver
            print(
                f"[genmem train] {images_seen}/{self.total_images} images ({100 * images_seen / max(self.total_images, 1):.0f}%) "
                f"loss {metrics['train/loss']:.4f}, {metrics['train/images_per_s']:.0f} images/s",
                flush=True,
            )

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None:
        self.tracker.image(name, picture, step=images_seen)

    def checkpoint_path(self, images_seen: int, final: bool) -> Path:
        tmp = tempfile.mkdtemp(prefix="genmem-ckpt-")
        self._tmp.append(tmp)
        return Path(tmp) / "checkpoint"

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None:
        report = {**metrics, "step": step, "images_seen": images_seen}
        if path is not None:
            # train/* is already logged at its own interval; the rest (dist/*) only comes here
            self.tracker.metrics({k: v for k, v in metrics.items() if not k.startswith("train/")}, step=images_seen)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        else:
            ray.train.report(report)
        for tmp in self._tmp:  # report() has persisted the checkpoint to storage
            shutil.rmtree(tmp, ignore_errors=True)
        self._tmp.clear()
        for hook in self.hooks:
            hook(self.rank, images_seen, final)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    # The driver's view of storage and tracking wins over whatever the worker process inherited.
    os.environ["GENMEM_STORAGE"] = loop_config["storage"]
    os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    cfg = TrainConfig.model_validate(loop_config["config"])
    engine = AccelerateEngine(cfg.scaling.mixed_precision)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            resume = load_checkpoint(folder, use_ema=False, with_optimizer=True)
    else:
        resume = _persisted_checkpoint(Path(loop_config["run_dir"]))
    init = None
    if resume is None and cfg.init_from:
        init = load_checkpoint(cfg.init_from, expect=cfg.model, use_ema=False)
    tracker = Tracker(loop_config["run_id"]) if engine.is_main and loop_config.get("run_id") else Tracker.disabled()
    train, heldout = load_dataset(cfg.data)
    total = -(-cfg.images // cfg.batch_size) * cfg.batch_size
    reporter = RayReporter(tracker, engine.rank, loop_config.get("hooks", ()), total_images=total)
    probe = None
    if cfg.eval_every_images and engine.is_main:
        from genmem.evaluation import memorisation_probe

        probe = memorisation_probe(cfg, train, heldout)
    train_loop(cfg, train, reporter, engine=engine, resume=resume, init=init, probe=probe)


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run in Ray's storage, oldest first (Ray names them by time)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / "meta.json").is_file())


def _latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def _persisted_checkpoint(run_dir: Path):
    """The newest complete checkpoint on storage. A worker killed right after a report can beat
    Ray's controller to registering it, and the restarted group is then handed no checkpoint
    although it was persisted; without this the run would start again from step 0."""
    for path in reversed(_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, use_ema=False, with_optimizer=True)
        except (CheckpointError, OSError):
            continue  # still being copied, or pruned meanwhile: take an older one
    return None


def preflight(cfg: TrainConfig) -> None:
    """Everything that can be checked before Ray work starts: tracking, storage, data."""
    check_reachable()
    ensure_writable(storage_root())
    ensure_writable(ray_storage())
    train, _ = load_dataset(cfg.data)  # materialises once, and fails here on bad data
    if cfg.init_from:
        init = read_meta(cfg.init_from)  # a clear error for a missing or foreign folder
        if tuple(init["shape"]) != train.shape:
            raise CheckpointError(
                f"init_from checkpoint {cfg.init_from} generates shape {tuple(init['shape'])} but the data has shape {train.shape}: "
                "fine-tune a model trained on data of this shape"
            )
        load_checkpoint(cfg.init_from, expect=cfg.model)  # refuses another architecture, naming the key


def fit(
    cfg: TrainConfig,
    *,
    hooks: Sequence[Hook] = (),
    kind: str = "train",
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train on Ray workers; returns the checkpoint path, MLflow run id and key figures.

    ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback()`` when a Tune trial drives it."""
    preflight(cfg)
    ensure_ray()
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker if s.use_gpu else 0.0}
    if s.check_resources:
        check_placeable(bundle, s.num_workers, s.placement_strategy, f"scaling.num_workers={s.num_workers}")

    run_name = cfg.run_name or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    previous = _latest_checkpoint(ray_storage() / run_name) if cfg.run_name else None
    run_id = read_meta(previous).get("mlflow_run_id") if previous else None
    # A named run is resumable: reopen its MLflow run (from the checkpoint, else by key) instead of
    # starting a second one for the same training.
    tracker = Tracker(run_id) if run_id else Tracker.start(
        kind, run_name, params=cfg.model_dump(mode="json"), tags={"ray_run_name": run_name, **(tags or {})},
        parent_run_id=parent_run_id, key=run_name if cfg.run_name else None,
    )
    if not run_id:
        tracker.text(to_yaml(cfg), "config.yaml")

    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "run_id": tracker.run_id,
            "tracking_uri": tracking_uri(),
            "storage": str(storage_root()),
            "run_dir": str(ray_storage() / run_name),
            "hooks": list(hooks),
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={k: v for k, v in bundle.items() if v > 0},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(ray_storage()),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=s.num_to_keep),
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise
    checkpoint = Path(result.checkpoint.path)
    tracker.tags({"checkpoint_uri": str(checkpoint), "ray_storage": str(ray_storage() / run_name)})
    tracker.finish()
    meta = read_meta(checkpoint)
    return {
        "checkpoint": str(checkpoint),
        "grid": str(checkpoint / "samples.png"),
        "run_name": run_name,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracking_uri(),
        "step": meta["step"],
        "images_seen": meta["images_seen"],
        "loss": result.metrics.get("train/loss"),
        "param_spread": result.metrics.get("dist/param_spread"),
        "parameters": meta["parameters"],
        "num_workers": s.num_workers,
    }

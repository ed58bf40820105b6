"""The evaluate job: samples generated across Ray tasks (or read from Parquet), every metric
against the checkpoint's own training and held-out data, and one MLflow run with the figures."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from genmem.checkpoint import CheckpointError, read_meta
from genmem.config import EvaluateConfig, TrainConfig, to_yaml
from genmem.data import load_dataset, load_real, read_shards
from genmem.evaluation import evaluate_samples, feature_names
from genmem.storage import ensure_writable, storage_root
from genmem.tracking import Tracker, check_reachable


def training_data(checkpoint: str | Path):
    """The checkpoint's training and held-out splits, verified against its manifest hash.

    A model trained on a real/synthetic mix is measured against the real rows alone: copying
    its own generated training rows is not what memorisation asks about."""
    meta = read_meta(checkpoint)
    if not meta.get("data_manifest"):
        raise CheckpointError(f"checkpoint {checkpoint} records no training-data manifest: it cannot be evaluated against its data")
    cfg = TrainConfig.model_validate(meta["config"])
    train, heldout = load_dataset(cfg.data)
    if train.manifest.sha256 != meta["data_manifest"]:
        raise CheckpointError(
            f"the training data of {checkpoint} no longer matches its manifest hash: restore the dataset it was trained on"
        )
    if cfg.data.synthetic:
        train, heldout = load_real(cfg.data)
    return meta, train, heldout


def run_evaluate(cfg: EvaluateConfig, *, parent_run_id: str | None = None) -> dict[str, Any]:
    check_reachable()
    meta, train, heldout = training_data(cfg.checkpoint)
    if cfg.samples:
        generated = read_shards(cfg.samples)
        samples_path = cfg.samples
    else:
        from genmem.distributed.sampling import sample

        out = ensure_writable(storage_root() / "samples") / f"{meta['checkpoint_id']}-seed{cfg.seed}-n{cfg.n}-{uuid.uuid4().hex[:6]}"
        samples_path = sample(cfg.checkpoint, cfg.n, out, seed=cfg.seed, tasks=cfg.tasks)["samples"]
        generated = read_shards(samples_path)
    result = evaluate_samples(generated, train, heldout, cfg, cache_dir=storage_root() / "features")

    tags = {"checkpoint": str(cfg.checkpoint), "checkpoint_id": meta["checkpoint_id"], "samples": str(samples_path),
            "features": ",".join(feature_names(cfg.features, train))}
    if meta.get("mlflow_run_id"):
        tags["train_run_id"] = meta["mlflow_run_id"]
    tracker = Tracker.start("evaluate", f"evaluate-{meta['checkpoint_id']}", params=cfg.model_dump(mode="json"), tags=tags,
                            parent_run_id=parent_run_id)
    log_evaluation(tracker, result, cfg, step=meta.get("images_seen", 0))
    tracker.finish()
    return {"mlflow_run_id": tracker.run_id, "samples": str(samples_path), **{k.removeprefix("eval/"): v for k, v in result.metrics.items()}}


def log_evaluation(tracker: Tracker, result, cfg: EvaluateConfig, *, step: int = 0, figure_step: int | None = None) -> None:
    """An evaluation into a run: metrics at ``step``, the figures (by ``figure_step`` when given),
    the most memorised samples with their provenance, and the evaluate config."""
    tracker.metrics(result.metrics, step=step)
    for name, picture in result.figures.items():
        tracker.image(name, picture, step=figure_step)
    tracker.text(json.dumps(result.most_memorised, indent=2), "most_memorised.json")
    tracker.text(to_yaml(cfg), "evaluate.yaml")

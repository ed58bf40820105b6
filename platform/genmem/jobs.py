"""Jobs: ``run_<job>(config) -> result dict``. The CLI, the ``ray job submit`` entry points and
Tune trials all call these; each validates, calls the library, and records what it produced."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.data import load_dataset, write_shards
from genmem.generative import build_process, generate
from genmem.storage import ensure_writable, storage_root
from genmem.training import train_loop
from genmem.viz import save_png


class LocalReporter:
    """Training side effects for a single local process: a progress bar, grid PNGs and the
    checkpoint folder (periodic checkpoints overwrite it; the last one stays)."""

    def __init__(self, output: Path, total_images: int, start_images: int = 0, quiet: bool = False):
        self.output = output
        self.grids: list[Path] = []
        self.bar = tqdm(total=total_images, initial=start_images, unit="img", unit_scale=True, disable=quiet, desc="train")

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None:
        self.bar.update(images_seen - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None:
        self.grids.append(save_png(picture, self.output / "grids" / f"{name}-{images_seen:012d}.png"))

    def checkpoint_path(self, images_seen: int, final: bool) -> Path:
        return self.output / "checkpoint"

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None:
        if final:
            self.bar.update(images_seen - self.bar.n)
            self.bar.close()


def default_output(name: str) -> Path:
    """A fresh run's folder: unique, so two runs never share a checkpoint."""
    return storage_root() / "runs" / f"{name}-{uuid.uuid4().hex[:8]}"


def run_train(cfg: TrainConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Train locally in this process; returns the checkpoint path and key figures."""
    output = Path(cfg.output) if cfg.output else default_output(cfg.name)
    ensure_writable(output.parent)
    train, heldout = load_dataset(cfg.data)
    reporter = LocalReporter(output, -(-cfg.images // cfg.batch_size) * cfg.batch_size, quiet=quiet)
    fresh = not output.exists()
    try:
        result = train_loop(cfg, train, reporter)
    except BaseException:
        # A failed fresh run leaves nothing behind unless it completed a checkpoint.
        if fresh and not (output / "checkpoint").exists():
            shutil.rmtree(output, ignore_errors=True)
        raise
    return {
        **result.as_dict(),
        "grid": str(reporter.grids[-1]) if reporter.grids else None,
        "train_size": len(train),
        "heldout_size": len(heldout),
        "data_manifest": train.manifest.sha256,
    }


def run_sample(checkpoint: str | Path, n: int, out: str | Path, *, seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
    """Generate samples 0..n-1 of ``seed`` from a checkpoint's EMA weights into Parquet."""
    if n <= 0:
        raise ValueError(f"--n must be a positive number of samples, not {n}")
    ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    ensure_writable(out.parent)
    process = build_process(ckpt.config.process)
    x = generate(ckpt.model, process, ckpt.config.sampler, ckpt.shape, range(n), seed, batch_size=batch_size)
    manifest = write_shards(
        out,
        x,
        {"model_id": np.full(n, ckpt.id), "seed": np.full(n, seed, dtype=np.int64), "index": np.arange(n)},
        source=f"checkpoint:{ckpt.id}",
        split="samples",
        extra={"checkpoint": str(ckpt.path), "sampler": ckpt.config.sampler.model_dump()},
    )
    return {"samples": str(out), "n": n, "seed": seed, "checkpoint": str(ckpt.path), "checkpoint_id": ckpt.id, "sha256": manifest.sha256}

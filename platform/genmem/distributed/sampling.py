"""Sampling as Ray tasks: N samples split into contiguous index ranges, one task per range, each
writing its Parquet shard. Sample k still depends only on (seed, k), so the split changes nothing."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genmem.checkpoint import load_checkpoint, read_meta
from genmem.data import DataError, read_shards, seal_shards, write_part
from genmem.distributed.cluster import attached, ensure_ray
from genmem.distributed.tasks import map_tasks
from genmem.errors import ConfigError
from genmem.generative import build_process, generate
from genmem.metrics.outliers import out_of_range_fraction, range_warning
from genmem.storage import ensure_writable, local_path, pull, remove, uri_of


def _sample_part(checkpoint: str, start: int, stop: int, seed: int, staging: str, part: int, batch_size: int) -> tuple[int, float]:
    """Write samples start..stop-1 as part ``part``; return their count and that count times the
    fraction of their values out of the training data's range (0 for a checkpoint that did not
    record the range), so the driver's sum over parts divided by n is the overall fraction."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(checkpoint, map_location=device)
    process = build_process(ckpt.config.process)
    x = generate(ckpt.model, process, ckpt.config.sampler, ckpt.shape, range(start, stop), seed, batch_size=batch_size, device=device)
    n = stop - start
    write_part(staging, part, x, {"model_id": np.full(n, ckpt.id), "seed": np.full(n, seed, dtype=np.int64), "index": np.arange(start, stop)})
    lo_hi = ckpt.meta.get("data_range")
    return n, (out_of_range_fraction(x, *lo_hi) * n if lo_hi else 0.0)


# Up to this many samples, with no task count asked for and no Ray cluster attached, are drawn in
# this process: starting a local cluster for them would take longer than the sampling.
IN_PROCESS_SAMPLES = 5000


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def sample(
    checkpoint: str | Path,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    tasks: int | None = None,
    batch_size: int = 256,
    gpus_per_task: float | None = None,
    cpus_per_task: float = 1.0,
) -> dict[str, Any]:
    """Generate samples 0..n-1 of ``seed`` from a checkpoint's EMA weights into Parquet shards.

    ``gpus_per_task=None`` (auto) takes one GPU a task where the cluster has GPUs; 0 never does.
    ``tasks=None``: one per GPU (or CPU) of the cluster. Up to :data:`IN_PROCESS_SAMPLES` with no
    ``tasks`` and no cluster attached are drawn in this process, as one part."""
    if n <= 0:
        raise ConfigError(f"--n must be a positive number of samples, not {n}")
    meta = read_meta(checkpoint)  # a clear error before any Ray work
    out = local_path(out)  # a URI is written through its local mirror
    ensure_writable(out.parent)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    in_process = not tasks and n <= IN_PROCESS_SAMPLES and not attached()
    if in_process:
        ranges = [(0, n)]
    else:
        import ray

        ensure_ray()
        if gpus_per_task is None:
            gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        ranges = split_ranges(n, tasks or max(1, int(ray.cluster_resources().get("GPU" if gpus_per_task else "CPU", 1))))
    try:
        # By URI under a remote store: a task on another node writes through its own mirror.
        calls = [(uri_of(checkpoint), a, b, seed, uri_of(staging), i, batch_size) for i, (a, b) in enumerate(ranges)]
        parts = [_sample_part(*calls[0])] if in_process else map_tasks(
            _sample_part, calls, num_cpus=cpus_per_task, num_gpus=gpus_per_task, desc="sample", total=n, progress=lambda r: r[0],
            unit="sample")
        manifest = seal_shards(
            staging, out, source=f"checkpoint:{meta['checkpoint_id']}", split="samples",
            extra={"checkpoint": uri_of(checkpoint), "seed": seed, "sampler": meta["config"]["sampler"]},
        )
    finally:
        remove(staging)  # the parts, here and (under a remote store) there
    out_of_range = sum(p[1] for p in parts) / n
    warning = range_warning(out_of_range, *meta["data_range"]) if meta.get("data_range") else None
    if warning:
        print(f"[genmem sample] {warning}", file=sys.stderr, flush=True)
    return {
        "samples": uri_of(out),
        "out_of_range_fraction": out_of_range,
        "n": n,
        "seed": seed,
        "tasks": len(ranges),
        "checkpoint": str(checkpoint),
        "checkpoint_id": meta["checkpoint_id"],
        "sha256": manifest.sha256,
    }


def sample_once(checkpoint: str, n: int, out: str | Path, *, seed: int, scaling) -> torch.Tensor:
    """``n`` samples of ``checkpoint`` at ``out`` (Parquet, on Ray tasks sized by ``scaling``, a
    ``ScalingConfig``), read back as a tensor; a restarted run that already wrote them reuses them."""
    if not (pull(out) / "manifest.json").is_file():
        sample(checkpoint, n, out, seed=seed, tasks=scaling.num_workers, cpus_per_task=scaling.cpus_per_worker,
               gpus_per_task=scaling.gpus_per_worker if scaling.use_gpu else 0.0)
    x = read_shards(out).x
    if len(x) != n:
        raise DataError(f"{out} holds {len(x)} samples, not {n}: remove it or use another run_name")
    return x

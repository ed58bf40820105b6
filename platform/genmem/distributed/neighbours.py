"""Exact k nearest neighbours over a training set too large for one process: one Ray task per
shard of the reference (a Parquet part file it reads itself, or a row range put in the object
store), each with all the queries, returning its exact top-k (:func:`genmem.metrics.neighbours.knn`,
float64 recompute included); :func:`genmem.metrics.neighbours.merge_topk` makes the global
top-k, equal to the single-process search.

Usage::

    d, i = sharded_knn(samples, "store/datasets/mnist-.../train", k=2)   # one task per part file
    d, i = sharded_knn(samples, train.x, k=2, rows_per_task=100_000)      # row ranges of a tensor
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from torch import Tensor

from genmem.metrics.neighbours import knn, merge_topk
from genmem.storage import pull


def _shard_knn(queries: Tensor, shard, offset: int, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    if isinstance(shard, str):  # a Parquet part file: read here, on whichever node runs the task
        from genmem.data.shards import read_shards

        shard = read_shards(shard).x
    d, i = knn(queries, shard, min(k, len(shard)), chunk_size=chunk_size)
    return d, i + offset


def _parts(folder: str | Path) -> list[tuple[str, int, int]]:
    """(part file, first row, rows) of a shard folder, rows from the Parquet footers alone."""
    files = sorted(pull(folder).glob("*.parquet"))
    out, start = [], 0
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        if n:
            out.append((str(f), start, n))
        start += n
    return out


def sharded_knn(queries: Tensor, reference: str | Path | Tensor, k: int, *, rows_per_task: int = 100_000,
                shards: int | None = None, cpus_per_task: float = 1.0, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest reference rows of each query (exact L2 in float64, ties by index), as
    :func:`genmem.metrics.neighbours.knn` returns them, searched by Ray tasks over shards of
    ``reference``: a shard folder (one task per part file) or a tensor (``rows_per_task`` rows
    per task, or ``shards`` near-equal row ranges). The queries go to the object store once."""
    import ray

    from genmem.distributed.cluster import ensure_ray

    if isinstance(reference, Tensor):
        if shards is not None:
            if not 1 <= shards <= len(reference):
                raise ValueError(f"shards = {shards} asked for but the reference has {len(reference)} rows: "
                                 f"use 1 <= shards <= {len(reference)}")
            rows_per_task = -(-len(reference) // shards)
        if rows_per_task < 1:
            raise ValueError(f"rows_per_task must be positive, got {rows_per_task}")
        shards = [(reference[s : s + rows_per_task], s, len(reference[s : s + rows_per_task])) for s in range(0, len(reference), rows_per_task)]
    else:
        shards = _parts(reference)
        if not shards:
            raise ValueError(f"reference folder {reference} holds no rows in .parquet parts: point at a shard folder written by genmem")
    total = sum(n for _, _, n in shards)
    if not 1 <= k <= total:
        raise ValueError(f"k = {k} neighbours asked for but the reference has N = {total} rows: use 1 <= k <= {total}")
    ensure_ray()
    shards = [(ray.put(s.contiguous()) if isinstance(s, Tensor) else s, offset, n) for s, offset, n in shards]
    q = ray.put(queries.detach().cpu())
    task = ray.remote(num_cpus=cpus_per_task)(_shard_knn)
    parts = ray.get([task.remote(q, shard, offset, k, chunk_size) for shard, offset, _ in shards])
    return merge_topk(parts, k)


def neighbour_search(cfg, train_rows: int):
    """The memorisation test's search for a ``MetricsConfig``: None (this process) or the sharded
    search on Ray tasks, by ``cfg.neighbours`` (auto: sharded above ``cfg.shard_rows`` rows)."""
    if cfg.neighbours == "local" or (cfg.neighbours == "auto" and train_rows <= cfg.shard_rows):
        return None
    return partial(sharded_knn, rows_per_task=cfg.shard_rows, chunk_size=cfg.chunk_size)

"""Seeded splits, subsets and the real/synthetic mix of the self-consuming loop.

Every choice of rows comes from a ``torch.Generator`` seeded by the caller, so the same seed
selects the same rows in any process; selected rows keep their source order.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .dataset import ArrayDataset, content_hash
from .errors import DataError


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split(ds: ArrayDataset, heldout_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Disjoint (train, heldout) with round(heldout_fraction * n) heldout rows chosen by ``seed``."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    perm = _permutation(len(ds), seed)
    n_held = round(heldout_fraction * len(ds))
    train, heldout = perm[n_held:].sort().values, perm[:n_held].sort().values
    return _named(ds.take(train), "train"), _named(ds.take(heldout), "heldout")


def _named(ds: ArrayDataset, name: str) -> ArrayDataset:
    return dataclasses.replace(ds, manifest=dataclasses.replace(ds.manifest, split=name))


def subset(ds: ArrayDataset, size: int, seed: int) -> ArrayDataset:
    """``size`` rows of ``ds`` chosen by ``seed`` (memorisation vs training-set size studies)."""
    if size > len(ds):
        raise DataError(
            f"subset size {size} is larger than the {ds.manifest.split} split ({len(ds)} rows): "
            "lower data.train_size or add data"
        )
    return ds.take(_permutation(len(ds), seed)[:size].sort().values)


def _fill(like: np.ndarray, n: int) -> np.ndarray:
    # Rows that lack a provenance column (real rows have no model_id) get an obviously empty value.
    if like.dtype.kind in "iu":
        return np.full(n, -1, dtype=like.dtype)
    if like.dtype.kind == "f":
        return np.full(n, np.nan, dtype=like.dtype)
    if like.dtype.kind == "b":
        return np.zeros(n, dtype=bool)
    return np.full(n, "", dtype=object)


def select(ds: ArrayDataset, k: int, seed: int) -> ArrayDataset:
    """``k`` rows of ``ds`` chosen by a permutation seeded with ``seed``, in source order."""
    if k > len(ds):
        raise DataError(f"cannot select {k} rows from {len(ds)}: generate more samples or ask for fewer")
    return ds.take(_permutation(len(ds), seed)[:k].sort().values)


def as_synthetic(ds: ArrayDataset) -> ArrayDataset:
    """The same rows, every one marked generated in ``is_synthetic``."""
    return dataclasses.replace(ds, is_synthetic=torch.ones(len(ds), dtype=torch.bool))


def concat(parts: list[ArrayDataset], *, source: str = "mix", extra: dict | None = None) -> ArrayDataset:
    """All rows of ``parts`` in order. Labels are kept only if every part has them; a provenance
    column present in some parts only is filled with -1 / NaN / "" in the others; rows without
    an ``is_synthetic`` flag count as real."""
    if not parts:
        raise DataError("nothing to concatenate: give at least one dataset")
    for part in parts[1:]:
        if part.shape != parts[0].shape:
            raise DataError(
                f"cannot mix samples shaped {parts[0].shape} with samples shaped {part.shape}: "
                "generate samples at the data's shape"
            )
    x = torch.cat([p.x for p in parts])
    labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
    flags = torch.cat([p.is_synthetic if p.is_synthetic is not None else torch.zeros(len(p), dtype=torch.bool) for p in parts])
    meta = {}
    for name in dict.fromkeys(n for p in parts for n in p.meta):
        like = next(p.meta[name] for p in parts if name in p.meta)
        meta[name] = np.concatenate([p.meta.get(name, _fill(like, len(p))) for p in parts])
    manifest = dataclasses.replace(parts[0].manifest, n=len(x), sha256=content_hash(x, labels), source=source, extra=extra or {})
    return ArrayDataset(x, labels, torch.cat([p.index for p in parts]), manifest, flags, meta)


def mix(real: ArrayDataset, synthetic: ArrayDataset, ratio: float, seed: int) -> ArrayDataset:
    """Training set of generation g: every real row plus floor(ratio * len(real)) synthetic rows.

    The synthetic rows are chosen by a permutation seeded with ``seed`` and marked in
    ``is_synthetic``. Labels are kept only if both sides have them; provenance columns present
    on one side only are filled with -1 / NaN / "" on the other.
    """
    if ratio < 0:
        raise DataError(f"mixing ratio must be >= 0, got {ratio}")
    if real.shape != synthetic.shape:
        raise DataError(
            f"cannot mix real samples shaped {real.shape} with synthetic samples shaped {synthetic.shape}: "
            "generate samples at the data's shape"
        )
    k = synthetic_count(ratio, len(real))
    if k > len(synthetic):
        raise DataError(
            f"mix needs {k} synthetic rows (ratio {ratio} x {len(real)} real) but only {len(synthetic)} were given: "
            "generate more samples or lower the ratio"
        )
    extra = {
        "ratio": ratio,
        "seed": seed,
        "n_real": len(real),
        "n_synthetic": k,
        "real_sha256": real.manifest.sha256,
        "synthetic_sha256": synthetic.manifest.sha256,
    }
    return concat([real, as_synthetic(select(synthetic, k, seed))], extra=extra)


def synthetic_count(ratio: float, n_real: int) -> int:
    """floor(ratio * n_real), immune to float error such as 0.29 * 100 = 28.999999999999996."""
    return math.floor(ratio * n_real + 1e-9)

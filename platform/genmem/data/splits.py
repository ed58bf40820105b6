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
    # The tiny epsilon stops float error from flooring e.g. 0.29 * 100 = 28.999999999999996 to 28.
    k = math.floor(ratio * len(real) + 1e-9)
    if k > len(synthetic):
        raise DataError(
            f"mix needs {k} synthetic rows (ratio {ratio} x {len(real)} real) but only {len(synthetic)} were given: "
            "generate more samples or lower the ratio"
        )
    chosen = synthetic.take(_permutation(len(synthetic), seed)[:k].sort().values)
    x = torch.cat([real.x, chosen.x])
    labels = None if real.labels is None or chosen.labels is None else torch.cat([real.labels, chosen.labels])
    real_flags = real.is_synthetic if real.is_synthetic is not None else torch.zeros(len(real), dtype=torch.bool)
    flags = torch.cat([real_flags, torch.ones(k, dtype=torch.bool)])
    meta = {}
    for name in dict.fromkeys([*real.meta, *chosen.meta]):
        like = real.meta.get(name, chosen.meta.get(name))
        parts = [real.meta.get(name, _fill(like, len(real))), chosen.meta.get(name, _fill(like, k))]
        meta[name] = np.concatenate(parts)
    extra = {
        "ratio": ratio,
        "seed": seed,
        "n_real": len(real),
        "n_synthetic": k,
        "real_sha256": real.manifest.sha256,
        "synthetic_sha256": synthetic.manifest.sha256,
    }
    manifest = dataclasses.replace(real.manifest, n=len(x), sha256=content_hash(x, labels), source="mix", extra=extra)
    return ArrayDataset(x, labels, torch.cat([real.index, chosen.index]), manifest, flags, meta)

"""Memorisation by the nearest-neighbour distance ratio (METHODS.md §Metrics).

A generated x is memorised when d1/d2 < 1/3, where d1 ≤ d2 are its two smallest L2 distances to
the training set in pixel space (Yoon et al. 2023; Gu et al. 2023, "On memorization in diffusion
models"; after Carlini et al. 2023's relative-distance criterion). The same distances to a
held-out set give a threshold-free signal: copies sit much closer to train than to held-out data,
genuine samples about equally close.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from genmem.metrics.neighbours import knn

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class MemorisationReport:
    """Per-sample nearest-neighbour distances of generated samples to train (and held-out) data.

    ``d1``, ``d2``, ``ratio`` (float64) and ``nearest`` (index into train) have one entry per
    generated sample. An exact copy has d1 = 0 and ratio 0, also when train holds duplicates.
    """

    threshold: float
    n: int
    memorised_fraction: float
    d1: Tensor
    d2: Tensor
    ratio: Tensor
    nearest: Tensor
    heldout_d1: Tensor | None = None
    heldout_ratio: Tensor | None = None
    heldout_memorised_fraction: float | None = None

    def quantiles(self, qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
        """Quantiles of d1 and ratio (and their held-out twins), keyed like ``d1_q50``, ``heldout_ratio_q05``."""
        series = {"d1": self.d1, "ratio": self.ratio, "heldout_d1": self.heldout_d1, "heldout_ratio": self.heldout_ratio}
        q = torch.tensor(qs, dtype=torch.float64)
        out = {}
        for name, v in series.items():
            if v is not None:
                for qi, value in zip(qs, torch.quantile(v.cpu(), q).tolist()):
                    out[f"{name}_q{round(qi * 100):02d}"] = value
        return out

    def worst(self, k: int) -> Tensor:
        """Indices of the ``k`` generated samples with the smallest ratio (most memorised), ascending ratio."""
        return self.ratio.argsort(stable=True)[:k]

    def summary(self) -> dict[str, float]:
        """Scalars to log: fractions, quantiles, and ``d1_gap_q50`` = median held-out d1 - median train d1."""
        out = {"memorised_fraction": self.memorised_fraction, **self.quantiles()}
        if self.heldout_d1 is not None:
            out["heldout_memorised_fraction"] = self.heldout_memorised_fraction
            out["d1_gap_q50"] = self.heldout_d1.median().item() - self.d1.median().item()
        return out


def memorisation(
    generated: Tensor,
    train: Tensor,
    heldout: Tensor | None = None,
    *,
    threshold: float = 1 / 3,
    chunk_size: int = 4096,
    backend: str = "torch",
    device: torch.device | str | None = None,
    search: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None = None,
) -> MemorisationReport:
    """Nearest-neighbour memorisation of ``generated`` against ``train`` (and optionally ``heldout``).

    All sets must share the sample shape and scaling used for training; rows are flattened and
    compared with exact L2 (see :func:`genmem.metrics.neighbours.knn`).

    Usage::

        rep = memorisation(samples, train.x, heldout.x)
        rep.memorised_fraction, rep.summary()["d1_gap_q50"], rep.worst(16)

    ``search(queries, reference, k) -> (distances, indices)`` replaces the single-process exact
    search, e.g. :func:`genmem.distributed.neighbours.sharded_knn` over a training set split
    across Ray tasks (same contract, same result).
    """
    if generated.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"generated samples of shape {tuple(generated.shape[1:])} but the training data has shape "
            f"{tuple(train.shape[1:])}: generate with the training data's shape and scaling"
        )
    if heldout is not None and heldout.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"held-out data of shape {tuple(heldout.shape[1:])} but the training data has shape {tuple(train.shape[1:])}: pass the matching split"
        )
    if len(generated) == 0:
        raise ValueError("the generated set is empty: pass at least one sample")
    if len(train) < 2:
        raise ValueError(f"the training set has {len(train)} point(s) but the d1/d2 ratio needs at least 2")
    if heldout is not None and len(heldout) < 2:
        raise ValueError(f"the held-out set has {len(heldout)} point(s) but the d1/d2 ratio needs at least 2: pass more or heldout=None")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} is outside (0, 1): use e.g. 1/3 (Yoon et al. 2023)")
    search = search or partial(knn, chunk_size=chunk_size, backend=backend, device=device)
    d1, d2, ratio, nearest = _ratio(generated, train, search)
    report = MemorisationReport(
        threshold=threshold,
        n=len(generated),
        memorised_fraction=(ratio < threshold).double().mean().item(),
        d1=d1,
        d2=d2,
        ratio=ratio,
        nearest=nearest,
    )
    if heldout is not None:
        h1, _, hr, _ = _ratio(generated, heldout, search)
        report.heldout_d1, report.heldout_ratio = h1, hr
        report.heldout_memorised_fraction = (hr < threshold).double().mean().item()
    return report


def _ratio(x: Tensor, ref: Tensor, search: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d, i = search(x, ref, 2)
    d1, d2 = d[:, 0], d[:, 1]
    # d1 = 0 is a copy whatever d2 is; this also avoids 0/0 when ref holds duplicates of x.
    ratio = torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2)
    return d1, d2, ratio, i[:, 0]


def effective_memorisation(sizes: list[float], fractions: list[float], threshold: float = 0.9) -> float | None:
    """Effective model memorisation (Gu et al. 2023): the largest training-set size at which the
    memorised fraction still reaches ``threshold``, interpolated linearly in log size between the
    last grid point at or above it and the next; the largest size when every size reaches it
    (the grid ends too early to say more); None when none does."""
    if len(sizes) != len(fractions) or not sizes:
        raise ValueError(f"need one memorised fraction per size, got {len(sizes)} sizes and {len(fractions)} fractions")
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    n = [float(sizes[i]) for i in order]
    f = [float(fractions[i]) for i in order]
    above = [i for i, v in enumerate(f) if v >= threshold]
    if not above:
        return None
    i = above[-1]
    if i == len(n) - 1:
        return n[-1]
    w = (f[i] - threshold) / (f[i] - f[i + 1])
    return float(math.exp(math.log(n[i]) + w * (math.log(n[i + 1]) - math.log(n[i]))))

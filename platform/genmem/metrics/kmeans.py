"""Seeded k-means: the cells of Meehan et al.'s data-copying test (:mod:`genmem.metrics.copying`).

Lloyd's algorithm from k-means++ seeds (Arthur & Vassilvitskii 2007), ``restarts`` times, the
partition with the smallest within-cell sum of squares kept. Everything draws from one
``torch.Generator``, so a seed fixes the cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cells:
    """A partition of space by nearest centre: ``centres`` (k, d) float64, ``inertia`` the training
    set's within-cell sum of squared distances.

    Usage::

        cells = kmeans(train.flatten(1), 10, seed=0)
        cells.assign(samples)  # (m,) cell index of each row
    """

    centres: Tensor
    inertia: float

    @property
    def k(self) -> int:
        return len(self.centres)

    def assign(self, x: Tensor, chunk_size: int = 8192) -> Tensor:
        """The index of the nearest centre of each row of ``x`` (rows flattened), ties to the smaller index."""
        x = x.detach().flatten(1).to(self.centres.device, torch.float64)
        if x.shape[1] != self.centres.shape[1]:
            raise ValueError(f"rows have {x.shape[1]} features but the cells were fitted on {self.centres.shape[1]}: flatten both the same way")
        return torch.cat([torch.cdist(x[s : s + chunk_size], self.centres).argmin(1) for s in range(0, len(x), chunk_size)]) if len(x) \
            else torch.empty(0, dtype=torch.int64)


def kmeans(x: Tensor, k: int, *, seed: int = 0, restarts: int = 4, iterations: int = 100, tol: float = 1e-8) -> Cells:
    """k cells fitted to the rows of ``x`` (flattened, float64), seeded.

    A cell left empty by an update takes the row farthest from its centre, so every cell holds
    at least one row of ``x`` (given k distinct rows).
    """
    x = x.detach().flatten(1).to(torch.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"{k} k-means cells asked for but there are {len(x)} points: use 1 <= k <= {len(x)}")
    gen = torch.Generator().manual_seed(seed)
    best: Cells | None = None
    for _ in range(restarts):
        centres = _lloyd(x, _plus_plus(x, k, gen), iterations, tol)
        inertia = float(torch.cdist(x, centres).min(1).values.square().sum())
        if best is None or inertia < best.inertia:
            best = Cells(centres, inertia)
    return best


def _plus_plus(x: Tensor, k: int, gen: Tensor) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    d2 = (x - centres[0]).square().sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[torch.multinomial(p, 1, generator=gen)].squeeze(0))
        d2 = torch.minimum(d2, (x - centres[-1]).square().sum(1))
    return torch.stack(centres)


def _lloyd(x: Tensor, centres: Tensor, iterations: int, tol: float) -> Tensor:
    for _ in range(iterations):
        dist = torch.cdist(x, centres)
        label = dist.argmin(1)
        counts = torch.bincount(label, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, label, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = dist.gather(1, label[:, None]).squeeze(1).argmax()
            new[c] = x[far]
            dist[far] = 0  # not chosen twice
        shift = (new - centres).square().sum()
        centres = new
        if shift <= tol * x.square().sum() / len(x):
            break
    return centres

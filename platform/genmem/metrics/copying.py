"""The three-sample data-copying test C_T (Meehan, Chaudhuri & Dasgupta, AISTATS 2020).

A generator copies when its samples lie closer to the training set than fresh data from the same
distribution does. With L(x) the distance from x to its nearest training point, the Mann-Whitney
U statistic of L(generated) against L(held-out), z-scored under the null of equal distributions,
is Z_U: well below 0 = copying, about 0 = no evidence either way, well above 0 = underfitting
(samples farther from train than real data are). Copying can hide in a few regions while the rest
underfits, so C_T partitions space into k-means cells of the training set, computes Z_U in each
cell (distances to that cell's training points), and averages over the cells holding more than
``min_samples`` generated samples (the paper's τ = 20/m), weighted by the held-out set's share of
each cell.

The z-score is the paper code's (casey-meehan/data-copying, ``Zu``): U of the generated
distances (mid-ranks for ties), mean nm/2 - 0.5, standard deviation sqrt(nm(n+m+1)/12) without a
tie correction, so C_T and Z_U match it to round-off on the same cells (tests/test_copying.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genmem.metrics.kmeans import Cells, kmeans
from genmem.metrics.neighbours import knn

MIN_SAMPLES = 20  # Meehan et al. §5: a cell enters C_T with more than 20 generated samples (τ = 20/m)


@dataclass(frozen=True)
class CopyTest:
    """C_T and its parts. Per cell (k,): ``z`` (NaN where the cell has no generated or no held-out
    point), ``generated`` and ``heldout`` counts, ``used`` (in C_T). ``zu``: the global Z_U.

    Usage::

        test = data_copying(samples, heldout, train, cells=10, seed=0)
        test.ct, test.zu, test.copying_share, test.most_copying(3)
    """

    ct: float
    zu: float
    z: Tensor
    generated: Tensor
    heldout: Tensor
    used: Tensor
    alpha: float

    @property
    def critical_z(self) -> float:
        """A used cell copies significantly below this z: one-sided level alpha, Bonferroni over the used cells."""
        return float(torch.special.ndtri(torch.tensor(self.alpha / max(1, int(self.used.sum())), dtype=torch.float64)))

    @property
    def copying_share(self) -> float:
        """The share of used cells whose z lies below :attr:`critical_z`; NaN when no cell is used."""
        used = int(self.used.sum())
        return float((self.z[self.used] < self.critical_z).sum()) / used if used else math.nan

    def most_copying(self, n: int) -> Tensor:
        """Up to ``n`` used cells, most copying (lowest z) first."""
        cells = torch.nonzero(self.used).flatten()
        return cells[self.z[cells].argsort(stable=True)][:n]

    def cells(self) -> list[dict[str, float | int | bool | None]]:
        """One record per cell: its z (None where not computed), generated and held-out counts,
        whether it is in C_T, and whether it copies significantly."""
        crit = self.critical_z
        return [{"cell": c, "z": None if math.isnan(z) else z, "generated": int(g), "heldout": int(h), "used": bool(u),
                 "copies": bool(u) and z < crit}
                for c, (z, g, h, u) in enumerate(zip(self.z.tolist(), self.generated, self.heldout, self.used))]

    def summary(self) -> dict[str, float]:
        """Scalars to log: ``ct``, ``zu``, ``ct_cells_used`` and ``ct_copying_share``."""
        return {"ct": self.ct, "zu": self.zu, "ct_cells_used": float(self.used.sum()), "ct_copying_share": self.copying_share}


def mann_whitney_z(x: Tensor, y: Tensor) -> float:
    """Z-scored Mann-Whitney U of ``x`` against ``y`` as Meehan et al. compute it: U counts the
    pairs with x > y (ties one half), z = (U - (nm/2 - 0.5)) / sqrt(nm(n + m + 1)/12).
    Negative: x tends to be smaller than y."""
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError(f"the Mann-Whitney test needs both samples non-empty, got {m} and {n} values")
    ranks = midranks(torch.cat([x.flatten(), y.flatten()]).to(torch.float64))
    u = float(ranks[:m].sum()) - m * (m + 1) / 2
    return (u - (n * m / 2 - 0.5)) / math.sqrt(n * m * (n + m + 1) / 12)


def midranks(v: Tensor) -> Tensor:
    """1-based ranks of ``v``, tied values sharing the mean of their ranks (scipy's ``rankdata``)."""
    values, order = v.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def data_copying(
    generated: Tensor,
    heldout: Tensor,
    train: Tensor,
    *,
    cells: int | Cells = 10,
    seed: int = 0,
    min_samples: int = MIN_SAMPLES,
    alpha: float = 0.05,
    distances: tuple[Tensor, Tensor] | None = None,
) -> CopyTest:
    """C_T of ``generated`` against ``train`` with ``heldout`` as the fresh sample (rows flattened).

    ``cells``: the number of k-means cells fitted to ``train`` (seeded by ``seed``), or fitted
    :class:`Cells`. ``distances``: the global nearest-training-point distances of the generated
    and held-out rows where the caller has them (else computed), for Z_U.
    """
    gen, ho, tr = (t.detach().flatten(1) for t in (generated, heldout, train))
    partition = cells if isinstance(cells, Cells) else kmeans(tr, cells, seed=seed)
    labels = [partition.assign(t) for t in (gen, ho, tr)]
    gen_d, ho_d = distances if distances is not None else (knn(gen, tr, 1)[0][:, 0], knn(ho, tr, 1)[0][:, 0])
    return ct_statistic(gen, ho, tr, *labels, k=partition.k, min_samples=min_samples, alpha=alpha,
                        zu=mann_whitney_z(gen_d, ho_d))


def ct_statistic(gen: Tensor, ho: Tensor, tr: Tensor, gen_cells: Tensor, ho_cells: Tensor, tr_cells: Tensor, *, k: int,
                 min_samples: int = MIN_SAMPLES, alpha: float = 0.05, zu: float = math.nan) -> CopyTest:
    """C_T given each row's cell (0..k-1): the held-out-share-weighted mean of the in-cell Z_U
    over cells with more than ``min_samples`` generated rows. A cell without held-out rows has
    weight 0 (the paper's code refuses it instead) and no z."""
    count = lambda c: torch.bincount(c.cpu(), minlength=k)  # noqa: E731
    n_gen, n_ho, n_tr = count(gen_cells), count(ho_cells), count(tr_cells)
    z = torch.full((k,), math.nan, dtype=torch.float64)
    for c in torch.nonzero((n_gen > 0) & (n_ho > 0) & (n_tr > 0)).flatten().tolist():
        ref = tr[tr_cells == c]
        z[c] = mann_whitney_z(knn(gen[gen_cells == c], ref, 1)[0][:, 0], knn(ho[ho_cells == c], ref, 1)[0][:, 0])
    used = (n_gen > min_samples) & ~z.isnan()
    share = n_ho.to(torch.float64) / max(1, len(ho))
    ct = float((share[used] * z[used]).sum() / share[used].sum()) if used.any() else math.nan
    return CopyTest(ct=ct, zu=zu, z=z, generated=n_gen, heldout=n_ho, used=used, alpha=alpha)

"""The held-out contrast at matched sizes: how much closer generated samples lie to the training
set than to data the model never saw, with both reference sets of the same size.

The median nearest-neighbour distance to a set shrinks as the set grows, so the raw gap
median d(x, held-out) - median d(x, train) reads positive for a generator that never saw
train whenever train is the larger set (digits: 0.18 with 900 vs 449 rows). Here the larger set
is subsampled to the smaller one's size, ``draws`` times from a seeded generator; the gap is the
mean over draws and its spread their standard deviation. A generator independent of train reads
about 0 whatever the sizes; a copier reads well above 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from genmem.metrics import intervals
from genmem.metrics.neighbours import knn

Search = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class HeldoutGap:
    """Per draw b, ``to_heldout[b]`` and ``to_train[b]`` (m,): each sample's distance to the nearest
    row of the size-matched held-out and training sets. ``size``: the rows in each."""

    to_heldout: Tensor
    to_train: Tensor
    size: int

    @property
    def per_draw(self) -> Tensor:
        return self.to_heldout.median(1).values - self.to_train.median(1).values

    @property
    def gap(self) -> float:
        return float(self.per_draw.mean())

    @property
    def spread(self) -> float:
        return float(self.per_draw.std()) if len(self.per_draw) > 1 else 0.0

    def interval(self, draws: int, seed: int, level: float = intervals.LEVEL) -> tuple[float, float]:
        """Percentile interval over resampled generated rows, the r-th resample measured in
        subsample draw r mod B: it carries the samples' and the subsampling's variation."""
        rows = intervals.resamples(self.to_train.shape[1], draws, seed)
        b = torch.arange(draws) % len(self.to_train)
        values = self.to_heldout[b[:, None], rows].median(1).values - self.to_train[b[:, None], rows].median(1).values
        return intervals.percentile(values, level)


def size_matched_gap(generated: Tensor, train: Tensor, heldout: Tensor, *, draws: int = 5, seed: int = 0,
                     search: Search | None = None, measured: dict[str, Tensor] | None = None) -> HeldoutGap:
    """The held-out gap of ``generated`` with the larger of ``train``/``heldout`` subsampled to the
    smaller's size ``draws`` times (seeded). ``search``: an exact k-NN with :func:`knn`'s contract;
    ``measured``: each sample's distance to the whole ``"train"`` or ``"heldout"`` set where the
    caller has it (the smaller set is used whole, so it is not searched again).

    Usage::

        g = size_matched_gap(samples, train, heldout, draws=5, seed=0)
        g.gap, g.spread, g.interval(200, seed=0)
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    search = search or partial(knn)
    size = min(len(train), len(heldout))
    gen = torch.Generator().manual_seed(seed)
    to_ho, to_tr = [], []
    full = dict(measured or {})
    for _ in range(draws):
        for name, ref, out in (("heldout", heldout, to_ho), ("train", train, to_tr)):
            if len(ref) == size:  # the smaller set is used whole: measured once
                if name not in full:
                    full[name] = search(generated, ref, 1)[0][:, 0]
                out.append(full[name])
            else:
                out.append(search(generated, ref[torch.randperm(len(ref), generator=gen)[:size]], 1)[0][:, 0])
    return HeldoutGap(torch.stack(to_ho).to(torch.float64).cpu(), torch.stack(to_tr).to(torch.float64).cpu(), size)

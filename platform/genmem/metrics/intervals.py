"""Seeded bootstrap intervals over generated samples (Efron & Tibshirani 1993, ch. 13).

Every memorisation and quality figure is an estimate from a finite sample set, so it is reported
with an interval. A fraction of per-sample flags (memorised, authentic) of independent samples
is a binomial proportion and takes the Wilson score interval (Wilson 1927; Brown, Cai & DasGupta
2001): no Monte Carlo error, and honest at 0 and 1, where a bootstrap collapses to a point
(0 memorised of 1,000 is [0, 0.0038], not [0, 0]); on 100 seeded draws of 500 samples with a
known copy share of 0.3, the percentile bootstrap's 95% interval covered it 88 times with 300
resamples and 91 with 1,000. Other statistics are bootstrapped: the samples are redrawn with
replacement ``draws`` times from one seeded generator and the statistic recomputed. A median
takes the percentile interval. A plug-in statistic that resampling biases (the Fréchet distance
grows as duplicates shrink the sample's effective size: on 500 digits its bootstrap values sat
around 0.2 above the estimate) takes the bootstrap's spread about its own median, placed at the
estimate: the interval says how far another sample set of this size would move the figure and
always holds it; the plug-in bias itself is left in, as every FD in the field leaves it. """

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LEVEL = 0.95


def resamples(n: int, draws: int, seed: int) -> Tensor:
    """(draws, n) row indices drawn with replacement from ``range(n)``, seeded."""
    return torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))


def percentile(values: Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` range of bootstrap ``values`` (NaNs dropped)."""
    v = values[~values.isnan()].to(torch.float64)
    if not len(v):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = torch.quantile(v, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return lo, hi


def spread(estimate: float, values: Tensor, level: float = LEVEL, floor: float | None = None) -> tuple[float, float]:
    """The central ``level`` range of bootstrap ``values`` shifted so that their median sits at
    ``estimate``, clipped at ``floor``."""
    lo, hi = percentile(values, level)
    centre = float(values[~values.isnan()].median())
    lo, hi = estimate - (centre - lo), estimate + (hi - centre)
    if floor is not None:
        lo, hi = max(lo, floor), max(hi, floor)
    return lo, hi


def fraction(flags: Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of the share of True among independent per-sample ``flags``."""
    n = len(flags)
    if not n:
        return float("nan"), float("nan")
    k = int(flags.sum())
    p = k / n
    z = float(torch.special.ndtri(torch.tensor(1 - (1 - level) / 2, dtype=torch.float64)))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 (or n) the bound is 0 (or 1) exactly; the formula leaves round-off there.
    return 0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)


def statistic(n: int, fn: Callable[[Tensor], float], draws: int, seed: int) -> Tensor:
    """``fn(rows)`` for ``draws`` resamples of ``range(n)``: the bootstrap values of any statistic."""
    return torch.tensor([fn(rows) for rows in resamples(n, draws, seed)], dtype=torch.float64)

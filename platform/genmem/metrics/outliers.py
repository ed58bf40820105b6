"""Generated values outside the training data's range: the first sign of a sampler that diverges
(noise saturated at the data range scores no worse on a memorisation test, and FD only says
"far")."""

from __future__ import annotations

import torch

RANGE_MARGIN = 0.25  # a value counts as out of range beyond a quarter of the data's width past either end
RANGE_WARN = 0.01  # the fraction above which sampling and evaluation say so


def out_of_range_fraction(x: torch.Tensor, lo: float, hi: float, margin: float = RANGE_MARGIN) -> float:
    """Fraction of the values of ``x`` beyond [lo, hi] widened by ``margin`` of its width on each
    side (data in [-1, 1]: beyond +-1.5): a sampler that diverges shows here before in any metric."""
    pad = margin * (hi - lo)
    x = x.detach().float()
    return float(((x < lo - pad) | (x > hi + pad)).float().mean()) if x.numel() else 0.0


def range_warning(fraction: float, lo: float, hi: float) -> str | None:
    """One line when ``fraction`` (see :func:`out_of_range_fraction`) is large, else None."""
    if fraction <= RANGE_WARN:
        return None
    pad = RANGE_MARGIN * (hi - lo)
    return (f"warning: {100 * fraction:.1f}% of generated values lie outside [{lo - pad:.3g}, {hi + pad:.3g}] (the training data "
            f"span [{lo:.3g}, {hi:.3g}]): the samples are not trustworthy; for diffusion try sampler.method=ddim, "
            "sampler.clip_denoised, more sampler.steps or process.prediction=v")

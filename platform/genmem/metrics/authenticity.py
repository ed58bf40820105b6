"""Authenticity (Alaa, van Breugel, Saveliev & van der Schaar, ICML 2022, §3.3).

A generated sample is inauthentic when it lies closer to its nearest training point than that
training point lies to its own nearest other training point: it sits inside the point's own
neighbourhood, where no other real datum reaches. authPct is the percentage of authentic samples.
The pairing is the paper's and dgm-eval's (``compute_authpct``): the generated sample's nearest
training point, compared with that point's nearest other training point; a tie counts as
inauthentic, as there.
"""

from __future__ import annotations

from torch import Tensor


def authentic(d1: Tensor, nearest: Tensor, train_nn: Tensor) -> Tensor:
    """Per generated sample, True where authentic: ``train_nn[nearest] < d1``.

    ``d1`` and ``nearest``: each sample's distance to, and index of, its nearest training point;
    ``train_nn``: each training point's distance to its nearest other training point (a
    duplicate in train is at 0, so nothing near it is authentic).

    Usage::

        d, i = knn(samples, train, 1)
        own = knn(train, train, 1, exclude_self=True)[0][:, 0]
        authpct = 100 * authentic(d[:, 0], i[:, 0], own).double().mean()
    """
    if d1.shape != nearest.shape:
        raise ValueError(f"d1 has shape {tuple(d1.shape)} but nearest has {tuple(nearest.shape)}: pass one entry per sample")
    return train_nn.to(d1.device)[nearest] < d1

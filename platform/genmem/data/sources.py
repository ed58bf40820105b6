"""Built-in sources: sklearn digits, labelled 2-D toys and linear Gaussian manifolds.

Every generator draws from its own ``numpy.random.default_rng(seed)``, never the global RNG, so
the same seed gives the same points in any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .dataset import ArrayDataset


def digits() -> ArrayDataset:
    """The 1797 sklearn digits as (1, 8, 8) images, pixel values 0..16 scaled to [-1, 1], labels 0..9."""
    from sklearn.datasets import load_digits  # here: sklearn costs every Ray worker 0.5 s to import

    bunch = load_digits()
    x = (bunch.images[:, None] / 8.0 - 1.0).astype(np.float32)
    extra = {"label_names": [str(d) for d in range(10)]}
    return ArrayDataset.from_tensors(x, bunch.target, source="digits", extra=extra)


def _moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # sklearn's make_moons curves with random positions along each arc; centred and scaled x2 to ~[-3, 3] x [-1.5, 1.5].
    label = rng.integers(0, 2, n)
    t = rng.uniform(0.0, math.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1)
    return (np.where(label[:, None] == 0, upper, lower) - [0.5, 0.25]) * 2.0, label


def _circles(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    label = rng.integers(0, 2, n)  # 0 = outer circle (radius 2), 1 = inner circle (radius 1)
    angle = rng.uniform(0.0, 2 * math.pi, n)
    radius = np.where(label == 0, 2.0, 1.0)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1), label


def _gaussians(modes: int) -> Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]:
    # FFJORD's "8gaussians": centres on a circle of radius 4 / sqrt(2) = 2 sqrt(2); mode k at angle 2 pi k / modes.
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        label = rng.integers(0, modes, n)
        angle = 2 * math.pi * label / modes
        return 2 * math.sqrt(2) * np.stack([np.cos(angle), np.sin(angle)], 1), label

    return draw


# The 4x4 checkerboard on [-2, 2]^2: unit cells (column i, row j) with i + j even are filled (8 of 16).
_CELLS = np.array([(i, j) for j in range(4) for i in range(4) if (i + j) % 2 == 0], dtype=float)


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    label = rng.integers(0, len(_CELLS), n)  # which filled cell, row-major from the bottom-left
    return _CELLS[label] - 2.0 + rng.uniform(size=(n, 2)), label


# name -> (draw, default noise std, label names). Gaussian modes use FFJORD's std 0.5 / sqrt(2).
TOYS = {
    "moons": (_moons, 0.1, ["upper", "lower"]),
    "circles": (_circles, 0.05, ["outer", "inner"]),
    "8gaussians": (_gaussians(8), 0.5 / math.sqrt(2), [f"mode{k}" for k in range(8)]),
    "6gaussians": (_gaussians(6), 0.5 / math.sqrt(2), [f"mode{k}" for k in range(6)]),
    "checkerboard": (_checkerboard, 0.0, [f"cell({int(i)},{int(j)})" for i, j in _CELLS]),
}


def _arc_distances(x: np.ndarray) -> np.ndarray:
    """Distances of points to the upper and lower moon (the noise-free arcs), shape (n, 2)."""
    t = np.linspace(0.0, math.pi, 721)
    arcs = [(np.stack([np.cos(t), np.sin(t)], 1) - [0.5, 0.25]) * 2.0,
            (np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1) - [0.5, 0.25]) * 2.0]
    return np.stack([np.linalg.norm(x[:, None] - a[None], axis=2).min(1) for a in arcs], 1)


def toy_regions(name: str, x: np.ndarray) -> np.ndarray:
    """The ground-truth region label of any 2-D points under toy ``name``: the nearest moon, ring
    or mode; for the checkerboard the filled cell a point lies in, -1 outside every filled cell.
    Labels index the toy's ``label_names``, as :func:`toy` draws them."""
    x = np.asarray(x, dtype=float).reshape(len(x), 2)
    if name == "moons":
        return _arc_distances(x).argmin(1)
    if name == "circles":
        r = np.linalg.norm(x, axis=1)
        return np.where(np.abs(r - 2.0) < np.abs(r - 1.0), 0, 1)
    if name in ("6gaussians", "8gaussians"):
        modes = int(name[0])
        angle = 2 * math.pi * np.arange(modes) / modes
        centres = 2 * math.sqrt(2) * np.stack([np.cos(angle), np.sin(angle)], 1)
        return np.linalg.norm(x[:, None] - centres[None], axis=2).argmin(1)
    if name == "checkerboard":
        cell = np.floor(x + 2.0)
        hit = (cell[:, None] == _CELLS[None]).all(2)
        return np.where(hit.any(1), hit.argmax(1), -1)
    raise ValueError(f"'{name}' is not a 2-D toy with regions: use one of {', '.join(TOYS)}")


def toy(name: str, n: int, seed: int, noise: float = 0.0) -> ArrayDataset:
    """``n`` seeded 2-D points of toy ``name`` with ground-truth region labels.

    ``noise`` is the std of isotropic Gaussian noise added to every point (the mode std for the
    Gaussian mixtures); 0 picks the source's default.
    """
    draw, default_noise, names = TOYS[name]
    rng = np.random.default_rng(seed)
    points, label = draw(rng, n)
    std = noise if noise > 0 else default_noise
    points = points + std * rng.standard_normal((n, 2))
    return ArrayDataset.from_tensors(
        points.astype(np.float32), label, source=name, extra={"n": n, "seed": seed, "noise": std, "label_names": names}
    )


def manifold(
    n: int, manifold_dim: int, ambient_dim: int, seed: int, variances: list[float] | None = None
) -> ArrayDataset:
    """``n`` points y = F z on a d-dimensional linear subspace of R^D, no labels.

    F (D x d) has orthonormal columns from a seeded QR; z ~ N(0, diag(variances)) with default
    variances linspace(1, 0.25, d), so the axes are distinguishable. ``manifest.extra`` records
    F, the variances and d: the data is N(0, F diag(v) F^T), whose exact score tests can use.
    """
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((ambient_dim, manifold_dim)))
    f = q * np.sign(np.diag(r))  # fixing the signs makes the QR factor unique, so F depends only on the seed
    var = np.asarray(variances if variances is not None else np.linspace(1.0, 0.25, manifold_dim), dtype=float)
    z = rng.standard_normal((n, manifold_dim)) * np.sqrt(var)
    extra = {
        "F": f.tolist(),
        "variances": var.tolist(),
        "manifold_dim": manifold_dim,
        "ambient_dim": ambient_dim,
        "seed": seed,
    }
    return ArrayDataset.from_tensors((z @ f.T).astype(np.float32), None, source="manifold", extra=extra)

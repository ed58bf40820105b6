"""Fréchet distance at d = 2048: genmem's symmetric eigvalsh form vs the scipy.linalg.sqrtm form.

Both run in the same process on the same statistics (Gaussian stats of random features shaped
like Inception pool3: 5000 samples, d = 2048, two different distributions). Prints seconds per
call (best of --repeats), the speed ratio (target >= 3x) and the relative agreement (target 1e-9),
for each BLAS thread count in --blas-threads. Multi-threaded OpenBLAS is very sensitive to other
load on the machine (spin-waiting threads), so one thread is the most repeatable comparison.

    .venv/bin/python bench/frechet.py [--n 5000] [--dim 2048] [--repeats 3] [--blas-threads 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from genmem.metrics.frechet import GaussianStats, frechet_distance, gaussian_stats


def sqrtm_form(a: GaussianStats, b: GaussianStats) -> float:
    """The form of Heusel et al. (2017) / pytorch-fid: tr of the real part of sqrtm(S1 S2)."""
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean.real))


def best_of(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blas-threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    # ReLU features with correlated coordinates, like pool3 activations; the second set is shifted
    # and mixed so the distance is far from 0 and the covariances do not commute.
    mix = torch.randn(args.dim, args.dim, generator=g, dtype=torch.float64) / args.dim**0.5
    real = torch.relu(torch.randn(args.n, args.dim, generator=g, dtype=torch.float64) @ mix)
    fake = torch.relu(torch.randn(args.n, args.dim, generator=g, dtype=torch.float64) @ (mix + 0.1 * torch.eye(args.dim, dtype=torch.float64)) + 0.05)
    a, b = gaussian_stats(real), gaussian_stats(fake)

    for threads in args.blas_threads:
        with threadpool_limits(limits=threads, user_api="blas"):
            t_sym, fd_sym = best_of(lambda: frechet_distance(a, b), args.repeats)
            t_sqrtm, fd_sqrtm = best_of(lambda: sqrtm_form(a, b), args.repeats)
        rel = abs(fd_sym - fd_sqrtm) / abs(fd_sqrtm)
        print(f"n={args.n} d={args.dim} blas_threads={threads} best of {args.repeats}")
        print(f"  genmem symmetric (eigvalsh)  {t_sym:8.3f} s   FD = {fd_sym:.12f}")
        print(f"  scipy.linalg.sqrtm form      {t_sqrtm:8.3f} s   FD = {fd_sqrtm:.12f}")
        print(f"  speed ratio sqrtm/symmetric  {t_sqrtm / t_sym:8.2f} x   (target >= 3)")
        print(f"  relative difference          {rel:.2e}   (target <= 1e-9)")

if __name__ == "__main__":
    main()

"""Exact 2-NN (the memorisation metric's workload): genmem knn vs faiss-cpu vs scikit-learn brute force,
and genmem's sharded search (one Ray task per training shard, exact merge) at 1 and 2 shards.

M generated vs N training rows of random float32 data, d = 64 and d = 3072. Prints seconds and
speed ratios measured in this run (ratio > 1: the reference is slower). Targets: genmem torch
>= 0.5x faiss; genmem's faiss backend ~ faiss (it adds only the float64 re-measure).

    .venv/bin/python bench/nearest_neighbours.py            # M = 10k, N = 50k
    .venv/bin/python bench/nearest_neighbours.py --small    # M = 2k, N = 10k
    .venv/bin/python bench/nearest_neighbours.py --shards 1 2   # also the sharded search (local Ray, 2 CPUs)
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from genmem.metrics.neighbours import knn


def timed(fn, repeats: int):
    """Best wall time of ``repeats`` calls (the minimum is the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def faiss_2nn(q: np.ndarray, r: np.ndarray):
    index = faiss.IndexFlatL2(r.shape[1])
    index.add(r)
    return index.search(q, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="M = 2k, N = 10k")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 3072])
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    p.add_argument("--shards", type=int, nargs="*", default=[], help="also time the sharded search at these shard counts")
    args = p.parse_args()
    if args.shards:
        import ray

        ray.init(num_cpus=max(2, max(args.shards)), include_dashboard=False, log_to_driver=False)
    m, n = (2_000, 10_000) if args.small else (10_000, 50_000)
    print(f"exact 2-NN, M = {m} vs N = {n}, best of {args.repeats}, torch threads = {torch.get_num_threads()}, faiss threads = {faiss.omp_get_max_threads()}")
    for d in args.dims:
        g = torch.Generator().manual_seed(d)
        r = torch.randn(n, d, generator=g)
        q = torch.cat([r[: m // 10], torch.randn(m - m // 10, d, generator=g)])  # 10% exact copies
        qn, rn = q.numpy(), r.numpy()
        faiss_2nn(qn[:100], rn[:1000]), knn(q[:100], r[:1000], 2)  # warm up thread pools
        n_rep = args.repeats
        t_faiss, (_, fi) = timed(lambda: faiss_2nn(qn, rn), n_rep)
        t_torch, (dt, it) = timed(lambda: knn(q, r, 2, chunk_size=args.chunk_size), n_rep)
        t_gfaiss, (_, ig) = timed(lambda: knn(q, r, 2, backend="faiss"), n_rep)
        t_sk, (_, si) = timed(lambda: NearestNeighbors(n_neighbors=2, algorithm="brute").fit(rn).kneighbors(qn), n_rep)
        agree = (it.numpy() == fi).all(1).mean(), (it.numpy() == si).all(1).mean(), (it == ig).all(1).double().mean().item()
        print(f"d = {d}")
        print(f"  faiss IndexFlatL2     {t_faiss:8.2f} s")
        print(f"  genmem knn (torch)    {t_torch:8.2f} s   speed vs faiss {t_faiss / t_torch:5.2f}x")
        print(f"  genmem knn (faiss)    {t_gfaiss:8.2f} s   speed vs faiss {t_faiss / t_gfaiss:5.2f}x")
        print(f"  sklearn brute         {t_sk:8.2f} s   speed vs faiss {t_faiss / t_sk:5.2f}x")
        print(f"  genmem torch vs sklearn: {t_sk / t_torch:5.2f}x faster")
        print(f"  copies at d1 == 0: {(dt[: m // 10, 0] == 0).double().mean().item():.3f};"
              f" index rows agreeing torch/faiss {agree[0]:.4f}, torch/sklearn {agree[1]:.4f}, torch/genmem-faiss {agree[2]:.4f}")
        for shards in args.shards:
            from genmem.distributed.neighbours import sharded_knn

            t_sh, (ds, i_s) = timed(lambda: sharded_knn(q, r, 2, shards=shards, chunk_size=args.chunk_size), n_rep)
            same = torch.equal(i_s, it) and torch.equal(ds, dt)
            print(f"  genmem sharded, {shards} shard(s) {t_sh:6.2f} s   speed vs genmem torch {t_torch / t_sh:5.2f}x;"
                  f" identical d and indices: {same}")


if __name__ == "__main__":
    main()

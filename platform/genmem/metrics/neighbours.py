"""Exact k nearest neighbours in L2 between flattened rows, with memory bounded by a chunk size.

Candidates are ranked with float32 GEMM distances ||a||² + ||b||² - 2ab (fast, but off by ~1e-2 at
d = 3072, so an exact copy would not read 0). Up to k + 8 of them are kept, and those within the
float32 error bound of the k-th are re-measured in float64 from the original rows and re-sorted.
Used by memorisation (d1/d2), PRDC radii and LID.
"""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("torch", "faiss")
# Spare candidates re-measured exactly: enough to absorb float32 rounding and near-ties at rank k.
_SPARE = 8
# Elements of the float64 difference tensor built at once when re-measuring (cache-sized: faster).
_RECOMPUTE_ELEMENTS = 1 << 20


def knn(
    queries: Tensor,
    reference: Tensor,
    k: int,
    *,
    chunk_size: int = 4096,
    backend: str = "torch",
    device: torch.device | str | None = None,
    exclude_self: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest rows of ``reference`` to each row of ``queries`` (rows flattened, exact L2).

    Returns ``(distances, indices)``, each (M, k): float64 distances ascending (ties broken by the
    smaller index) and int64 row indices into ``reference``, on the device of ``queries``. The torch
    backend works on ``device`` (default: that of ``queries``) in blocks of at most
    ``chunk_size`` × ``chunk_size``, so neither an M × N × d tensor nor the full M × N matrix is
    built. ``backend="faiss"`` ranks with ``faiss.IndexFlatL2`` on CPU instead. Either way the
    returned distances are recomputed in float64, so an exact copy is at distance 0.0.
    ``exclude_self=True`` treats row i of ``queries`` as row i of ``reference`` (same set) and never
    returns it: k-NN radii within one set.

    Usage::

        d, i = knn(generated, train, k=2)             # d[:, 0] = d1, d[:, 1] = d2
        r, _ = knn(feats, feats, k=3, exclude_self=True)  # r[:, -1] = 3rd-NN radius
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")
    if queries.ndim < 2 or reference.ndim < 2:
        raise ValueError(
            f"knn needs batches of rows, got shapes {tuple(queries.shape)} and {tuple(reference.shape)}: add a leading batch dimension"
        )
    q, r = queries.detach().flatten(1), reference.detach().flatten(1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} features per row but the reference has {r.shape[1]}: flatten both the same way")
    n = len(r) - int(exclude_self)
    if exclude_self and len(q) != len(r):
        raise ValueError(f"exclude_self needs queries and reference to be the same set, got {len(q)} and {len(r)} rows")
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} neighbours asked for but the reference has N = {len(r)} rows{' (excluding self)' if exclude_self else ''}: use 1 <= k <= {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    spare = min(k + _SPARE, n)
    if backend == "faiss":
        approx, cand = _faiss_candidates(q, r, spare, exclude_self)
    else:
        approx, cand = _torch_candidates(q, r, spare, chunk_size, torch.device(device) if device else q.device, exclude_self)
    # A float32 dot product of length d errs by at most ~d u |a||b| (Higham, Accuracy and Stability,
    # §3.1), so |error of d²| <= 2 (d + 2) u (|a|² + |b|²). Only candidates that could still beat the
    # k-th one under that bound need the exact re-measure: usually k of them, all k + 8 near ties.
    norms = q.float().norm(dim=1).square() + r.float().norm(dim=1).square().max()
    bound = 2 * (q.shape[1] + 2) * 2.0**-24 * norms.to(approx.device)
    need = int((approx <= approx[:, k - 1 : k] + 2 * bound[:, None]).sum(1).max())
    d, i = _exact_topk(q.to(r.device), r, cand[:, :need].to(r.device), k)
    return d.to(q.device), i.to(q.device)


def _torch_candidates(q: Tensor, r: Tensor, c: int, chunk: int, device: torch.device, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """The ``c`` smallest float32 GEMM squared distances per query (ascending) and their indices, via a running top-c."""
    r32 = r.to(device, torch.float32)
    rn = r32.pow(2).sum(1)
    out_d = torch.empty(len(q), c, device=device)
    out = torch.empty(len(q), c, dtype=torch.int64, device=device)
    for qs in range(0, len(q), chunk):
        qc = q[qs : qs + chunk].to(device, torch.float32)
        qn = qc.pow(2).sum(1, keepdim=True)
        best_d = torch.empty(len(qc), 0, device=device)
        best_i = torch.empty(len(qc), 0, dtype=torch.int64, device=device)
        for rs in range(0, len(r), chunk):
            rc = r32[rs : rs + chunk]
            d2 = torch.addmm(qn + rn[rs : rs + chunk], qc, rc.T, alpha=-2.0)
            if exclude_self and rs < qs + len(qc) and qs < rs + len(rc):
                rows = torch.arange(max(qs, rs), min(qs + len(qc), rs + len(rc)), device=device)
                d2[rows - qs, rows - rs] = float("inf")
            d, i = d2.topk(min(c, len(rc)), dim=1, largest=False)
            best_d, best_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + rs], 1)
            if best_d.shape[1] > c:
                best_d, j = best_d.topk(c, dim=1, largest=False)
                best_i = best_i.gather(1, j)
        best_d, j = best_d.sort(dim=1)
        out_d[qs : qs + len(qc)], out[qs : qs + len(qc)] = best_d, best_i.gather(1, j)
    return out_d, out


def _faiss_candidates(q: Tensor, r: Tensor, c: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu (or use backend='torch')") from exc
    index = faiss.IndexFlatL2(r.shape[1])
    index.add(r.cpu().float().contiguous().numpy())
    # One extra candidate so that dropping self (if faiss returned it) still leaves c.
    dist, idx = index.search(q.cpu().float().contiguous().numpy(), c + int(exclude_self))
    dist, idx = torch.from_numpy(dist), torch.from_numpy(idx)
    if exclude_self:
        own = idx == torch.arange(len(q))[:, None]
        # Rows where faiss did not return self: drop the last (farthest) candidate instead.
        own[:, -1] |= ~own.any(1)
        dist, idx = dist[~own].view(len(q), c), idx[~own].view(len(q), c)
    return dist, idx


def _exact_topk(q: Tensor, r: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Re-measure candidate distances in float64 from the original rows; keep the k smallest."""
    cand = cand.sort(dim=1).values  # index order first, so the stable sort below breaks ties by index
    dist = torch.empty(cand.shape, dtype=torch.float64, device=r.device)
    step = max(1, _RECOMPUTE_ELEMENTS // (cand.shape[1] * q.shape[1]))
    for s in range(0, len(q), step):
        diff = q[s : s + step, None, :].double() - r[cand[s : s + step]].double()
        dist[s : s + step] = torch.linalg.vector_norm(diff, dim=-1)
    dist, order = dist.sort(dim=1, stable=True)
    return dist[:, :k].contiguous(), cand.gather(1, order[:, :k])


def merge_topk(parts: list[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """The exact global top-``k`` from each reference shard's exact top-k (``(distances,
    global indices)``, as :func:`knn` returns them with the shard's row offset added): the k
    smallest distances over all shards, ties broken by the smaller index as :func:`knn` does."""
    d = torch.cat([p[0] for p in parts], dim=1)
    i = torch.cat([p[1].to(d.device) for p in parts], dim=1)
    if not 1 <= k <= d.shape[1]:
        raise ValueError(f"k = {k} neighbours asked for but the shards hold {d.shape[1]} candidates per query: use 1 <= k <= {d.shape[1]}")
    i, by_index = i.sort(dim=1)  # index order first, so the stable sort by distance breaks ties by index
    d = d.gather(1, by_index)
    d, order = d.sort(dim=1, stable=True)
    return d[:, :k].contiguous(), i.gather(1, order[:, :k])

"""Exact k-NN and the metrics built on it: memorisation ratio, PRDC, LID.

References: brute-force float64 distances, the authors' ``prdc`` package, data of known dimension,
and real digits for calibrating the memorisation ratio.
"""

from __future__ import annotations

import pytest
import torch

from genmem.config import DataConfig
from genmem.data.materialise import load_dataset
from genmem.metrics.lid import lid_mle, lid_twonn
from genmem.metrics.memorisation import memorisation
from genmem.metrics.neighbours import knn
from genmem.metrics.prdc import prdc


def brute(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All distances in float64 by explicit differences, sorted (ties by index)."""
    d = torch.cdist(q.flatten(1).double(), r.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.sort(dim=1, stable=True)


@pytest.fixture(scope="module")
def points():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(300, 3, 5, generator=g), torch.randn(1000, 15, generator=g)
    r[17] = r[500] = q[3].flatten()  # an exact copy, twice
    return q, r


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("chunk_size", [7, 64, 10_000])
def test_knn_matches_brute_force(points, k, chunk_size):
    q, r = points
    ref_d, ref_i = brute(q, r)
    d, i = knn(q, r, k, chunk_size=chunk_size)
    assert d.dtype == torch.float64 and i.dtype == torch.int64 and d.shape == (300, k)
    assert torch.equal(i, ref_i[:, :k])
    torch.testing.assert_close(d, ref_d[:, :k], rtol=0, atol=1e-12)
    assert d[3, 0].item() == 0.0 and i[3, 0].item() == 17


def test_knn_exclude_self_with_duplicates():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    x[30] = x[20] = x[10]
    full = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf"))
    ref_d, ref_i = full.sort(dim=1, stable=True)
    for cs in (16, 4096):
        d, i = knn(x, x, 3, chunk_size=cs, exclude_self=True)
        assert torch.equal(i, ref_i[:, :3])
        assert d[10, :2].tolist() == [0.0, 0.0] and i[10, :2].tolist() == [20, 30]


def test_knn_faiss_backend_agrees(points):
    pytest.importorskip("faiss")
    q, r = points
    for k in (1, 4):
        d, i = knn(q, r, k)
        fd, fi = knn(q, r, k, backend="faiss")
        assert torch.equal(fi, i)
        torch.testing.assert_close(fd, d, rtol=0, atol=1e-12)
    x = r[:200]
    assert torch.equal(knn(x, x, 3, backend="faiss", exclude_self=True)[1], knn(x, x, 3, exclude_self=True)[1])


def test_knn_errors(points):
    q, r = points
    with pytest.raises(ValueError, match="k = 1001 .* N = 1000"):
        knn(q, r, 1001)
    with pytest.raises(ValueError, match="k = 1000 .* N = 1000"):
        knn(r, r, 1000, exclude_self=True)
    with pytest.raises(ValueError, match="backend 'annoy'"):
        knn(q, r, 1, backend="annoy")
    with pytest.raises(ValueError, match="16 features"):
        knn(torch.randn(4, 16), r, 1)


# --- memorisation, calibrated on real digits (1438 train / 359 held-out, pixels in [-1, 1]) ---


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENMEM_STORAGE", str(tmp_path_factory.mktemp("store")))
        train, heldout = load_dataset(DataConfig(source="digits"))
    return train.x, heldout.x


def test_training_copies_are_memorised(digits):
    train, heldout = digits
    rep = memorisation(train[:500], train, heldout)
    assert rep.memorised_fraction >= 0.99 and torch.all(rep.d1 == 0)
    assert torch.equal(rep.nearest, torch.arange(500))  # the 1797 digits are all distinct
    s = rep.summary()
    assert s["heldout_d1_q50"] > s["d1_q50"] and s["d1_gap_q50"] > 1.0
    assert rep.heldout_memorised_fraction <= 0.02


def test_noisy_copies_are_memorised(digits):
    # sigma = 0.05 per pixel (0.4 px of the 0..16 scale): noise norm ~0.4 against a typical d2 of ~2,
    # ratio median ~0.19. At sigma = 0.1 the median ratio is ~0.36, right at the 1/3 threshold.
    train, _ = digits
    noisy = train + 0.05 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0))
    assert memorisation(noisy, train).memorised_fraction >= 0.9


def test_heldout_images_are_not_memorised(digits):
    train, heldout = digits
    rep = memorisation(heldout, train)
    assert rep.memorised_fraction <= 0.02 and rep.d1.min() > 0


def test_memorised_fraction_of_a_mix(digits):
    train, heldout = digits
    g = torch.Generator().manual_seed(0)
    copies = train[torch.randperm(len(train), generator=g)[:150]]
    mix = torch.cat([copies, heldout[:350]])[torch.randperm(500, generator=g)]
    rep = memorisation(mix, train, heldout)
    assert abs(rep.memorised_fraction - 0.30) <= 0.03
    worst = rep.worst(150)
    assert torch.all(rep.ratio[worst].diff() >= 0) and torch.all(rep.d1[worst] == 0)
    assert set(rep.quantiles()) >= {"d1_q05", "ratio_q50", "heldout_d1_q50", "heldout_ratio_q95"}


def test_memorisation_errors(digits):
    train, _ = digits
    with pytest.raises(ValueError, match=r"samples of shape \(64,\) but the training data has shape \(1, 8, 8\)"):
        memorisation(train.flatten(1), train)
    with pytest.raises(ValueError, match="generated set is empty"):
        memorisation(train[:0], train)
    with pytest.raises(ValueError, match="training set has 1 point"):
        memorisation(train, train[:1])
    with pytest.raises(ValueError, match=r"threshold 1.5 is outside \(0, 1\)"):
        memorisation(train, train, threshold=1.5)


# --- precision / recall / density / coverage ---


def test_prdc_extremes():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    same = prdc(x, x.clone())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert abs(same["density"] - 1) < 0.1
    assert prdc(x, x + 100) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_matches_reference_package(k):
    compute_prdc = pytest.importorskip("prdc").compute_prdc
    g = torch.Generator().manual_seed(3)
    real = torch.randn(500, 16, generator=g, dtype=torch.float64)
    fake = 1.2 * torch.randn(600, 16, generator=g, dtype=torch.float64) + 0.3
    ref = compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    ours = prdc(real, fake, k_pr=k, k_dc=k, chunk_size=128)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name


def test_prdc_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k = 5 .* N = 5"):
        prdc(x, torch.randn(50, 3))
    with pytest.raises(ValueError, match="3 dimensions but fake ones 4"):
        prdc(torch.randn(50, 3), torch.randn(50, 4))


# --- local intrinsic dimension ---


def manifold(n: int, big_d: int, d: int, seed: int) -> torch.Tensor:
    """y = F z with F orthonormal (D x d), z standard normal."""
    g = torch.Generator().manual_seed(seed)
    f, _ = torch.linalg.qr(torch.randn(big_d, d, generator=g, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ f.T


@pytest.mark.parametrize(("big_d", "d"), [(20, 4), (6, 6)])
def test_lid_recovers_dimension(big_d, d):
    # Seen over seeds 0..2: MLE mean within 0.09 and TwoNN within 0.2 of d; ±0.6 leaves room for
    # TwoNN's larger spread (it uses 2 neighbours per point, MLE k = 20).
    y = manifold(4000, big_d, d, seed=0)
    assert lid_mle(y, k=20).mean().item() == pytest.approx(d, abs=0.6)
    assert lid_twonn(y) == pytest.approx(d, abs=0.6)


def test_lid_errors():
    with pytest.raises(ValueError, match="k >= 3"):
        lid_mle(torch.randn(50, 3), k=2)
    with pytest.raises(ValueError, match="k = 20 .* N = 10"):
        lid_mle(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"discard_fraction 1.0 is outside \(0, 1\)"):
        lid_twonn(torch.randn(50, 3), discard_fraction=1.0)


def test_merging_shard_top_k_is_the_global_top_k_with_ties_by_index(points):
    from genmem.metrics.neighbours import merge_topk

    q, r = points
    r = r.clone()
    r[900] = r[17]  # a third copy, in another shard
    ref_d, ref_i = brute(q, r)
    for bounds in ([0, 400, 1000], [0, 17, 18, 501, 999, 1000]):  # uneven shards, one of a single row
        parts = []
        for lo, hi in zip(bounds, bounds[1:]):
            d, i = knn(q, r[lo:hi], min(5, hi - lo))
            parts.append((d, i + lo))
        d, i = merge_topk(parts, 5)
        assert torch.equal(i, ref_i[:, :5]) and torch.allclose(d, ref_d[:, :5], rtol=0, atol=1e-12)
        assert i[3, :3].tolist() == [17, 500, 900] and d[3, :3].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="k = 9 neighbours asked for but the shards hold 5 candidates"):
        merge_topk([(ref_d[:, :2], ref_i[:, :2]), (ref_d[:, 2:5], ref_i[:, 2:5])], 9)


def test_sharded_search_on_ray_tasks_equals_the_single_process_search(points, digits, tmp_path, ray_local):
    """Row ranges of a tensor and the part files of a shard folder, each a Ray task; and the
    memorisation report through it."""
    from genmem.data.shards import write_shards
    from genmem.distributed.neighbours import sharded_knn

    q, r = points
    ref_d, ref_i = knn(q, r, 3)
    assert ref_d[3, :2].tolist() == [0.0, 0.0] and ref_i[3, :2].tolist() == [17, 500]  # an exact copy, in two shards at 2 and 3
    for shards in (1, 2, 3):
        d, i = sharded_knn(q, r, 3, shards=shards, cpus_per_task=0.5)
        assert torch.equal(i, ref_i) and torch.equal(d, ref_d), shards
    d, i = sharded_knn(q, r, 3, rows_per_task=333, cpus_per_task=0.5)
    assert torch.equal(i, ref_i) and torch.equal(d, ref_d)
    write_shards(tmp_path / "ref", r.view(len(r), 3, 5), source="test", split="train", rows_per_shard=300)
    assert len(list((tmp_path / "ref").glob("*.parquet"))) == 4
    d, i = sharded_knn(q, str(tmp_path / "ref"), 3, cpus_per_task=0.5)
    assert torch.equal(i, ref_i) and torch.equal(d, ref_d)
    train, heldout = digits
    mix = torch.cat([train[:100], heldout[:200]])
    local = memorisation(mix, train, heldout)
    sharded = memorisation(mix, train, heldout, search=lambda a, b, k: sharded_knn(a, b, k, rows_per_task=500, cpus_per_task=0.5))
    assert sharded.memorised_fraction == local.memorised_fraction and torch.equal(sharded.ratio, local.ratio)
    assert sharded.heldout_memorised_fraction == local.heldout_memorised_fraction
    with pytest.raises(ValueError, match="k = 2000 neighbours asked for but the reference has N = 1000 rows"):
        sharded_knn(q, r, 2000)
    with pytest.raises(ValueError, match=r"shards = 1001 asked for but the reference has 1000 rows: use 1 <= shards <= 1000"):
        sharded_knn(q, r, 2, shards=1001)


def test_the_evaluation_shards_its_search_above_a_size_or_when_asked():
    from genmem.config import MetricsConfig
    from genmem.distributed.neighbours import neighbour_search

    assert neighbour_search(MetricsConfig(), 60_000) is None  # default: in this process up to 100,000 rows
    assert neighbour_search(MetricsConfig(shard_rows=500), 1000).keywords["rows_per_task"] == 500
    assert neighbour_search(MetricsConfig(neighbours="sharded"), 10) is not None
    assert neighbour_search(MetricsConfig(neighbours="local", shard_rows=5), 1000) is None

"""The copy tests (C_T, Z_U, authenticity, the size-matched gap, bootstrap intervals, the null
control) on cases with known answers, and against the peers' own code on a stored fixture."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, rankdata
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from genmem.metrics import intervals
from genmem.metrics.authenticity import authentic
from genmem.metrics.contrast import size_matched_gap
from genmem.metrics.copying import ct_statistic, data_copying, mann_whitney_z, midranks
from genmem.metrics.evidence import CopyReference, CopySettings
from genmem.metrics.kmeans import kmeans
from genmem.metrics.neighbours import knn

PEER = Path(__file__).parent / "fixtures" / "peer_copying.npz"


@pytest.fixture(scope="module")
def peer():
    with np.load(PEER) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


@pytest.fixture(scope="module")
def digits():
    """900 training and 897 held-out 8x8 digits in [-1, 1], split as examples/kde_digits_export.py does."""
    d = load_digits().images
    order = np.random.default_rng(0).permutation(len(d))
    x = torch.tensor(d / 8 - 1, dtype=torch.float32).reshape(len(d), -1)
    return x[order[:900]], x[order[900:]]


def test_ct_and_zu_match_meehan_et_al_code_on_the_same_cells(peer):
    """casey-meehan/data-copying's C_T, per-cell Z_U and global Z_U (tests/fixtures/peer_copying.py)."""
    gen, ho, tr = peer["generated"], peer["heldout"], peer["train"]
    m = len(gen)
    test = ct_statistic(gen, ho, tr, peer["generated_cells"], peer["heldout_cells"], peer["train_cells"], k=5,
                        min_samples=round(float(peer["tau"]) * m),
                        zu=mann_whitney_z(knn(gen, tr, 1)[0][:, 0], knn(ho, tr, 1)[0][:, 0]))
    assert test.ct == pytest.approx(float(peer["ct"]), abs=1e-6)
    assert test.zu == pytest.approx(float(peer["zu"]), abs=1e-6)
    assert torch.allclose(test.z, peer["zu_cells"], atol=1e-6)
    assert test.used.sum() >= 3  # the fixture exercises the cell weighting, not one cell


def test_authpct_matches_dgm_eval_exactly(peer):
    gen, tr = peer["generated"], peer["train"]
    d, i = knn(gen, tr, 1)
    own = knn(tr, tr, 1, exclude_self=True)[0][:, 0]
    flags = authentic(d[:, 0], i[:, 0], own)
    # dgm-eval returns a float32 percentage: the same count of authentic samples, exactly
    assert flags.sum().item() == round(float(peer["authpct"]) * len(flags) / 100)
    assert 0 < flags.sum() < len(flags)  # both kinds present


def test_midranks_and_u_statistic_match_scipy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    y = torch.randint(0, 6, (55,), generator=gen).double()
    assert torch.allclose(midranks(torch.cat([x, y])), torch.from_numpy(rankdata(torch.cat([x, y]).numpy())))
    u = mannwhitneyu(x.numpy(), y.numpy(), alternative="less").statistic
    expected = (u - (40 * 55 / 2 - 0.5)) / np.sqrt(40 * 55 * (40 + 55 + 1) / 12)
    assert mann_whitney_z(x, y) == pytest.approx(expected, abs=1e-12)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 3, generator=gen) * 10
    x = centres.repeat_interleave(50, 0) + torch.randn(200, 3, generator=gen)
    a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
    assert torch.equal(a.centres, b.centres)
    ours = a.assign(x)
    theirs = torch.from_numpy(KMeans(4, n_init=10, random_state=0).fit_predict(x.numpy()))
    # the same partition up to the cells' names: each of our cells is one of scikit-learn's
    assert all(len(theirs[ours == c].unique()) == 1 for c in range(4)) and len(ours.unique()) == 4


def test_exact_copies_read_as_copying_everywhere(digits):
    tr, ho = digits
    copies = tr[torch.randint(0, len(tr), (1000,), generator=torch.Generator().manual_seed(0))]
    ev = CopyReference.build(tr, ho, CopySettings(cells=10)).measure(copies)
    s = ev.summary()
    assert s["ct"] < -8 and s["zu"] < -20 and s["ct_copying_share"] == 1.0
    assert s["authpct"] == 0.0 and s["memorised_fraction"] == 1.0
    assert s["gap_lo"] > 1.0
    cells = ev.copy_test.cells()
    assert len(cells) == 10 and all(c["copies"] for c in cells if c["used"]) and sum(c["generated"] for c in cells) == 1000


def test_heldout_as_samples_reads_as_not_copying_whatever_the_sizes(digits):
    """The null: half the held-out set (448) as samples, 900 training rows, the other half (449)
    as held-out. The raw gap reads the size difference; the size-matched gap does not."""
    tr, ho = digits
    gaps, raw = [], []
    for seed in range(8):
        p = torch.randperm(len(ho), generator=torch.Generator().manual_seed(seed))
        a, b = ho[p[:448]], ho[p[448:]]
        g = size_matched_gap(a, tr, b, draws=5, seed=seed)
        gaps.append(g.gap)
        lo, hi = g.interval(200, seed)
        assert lo < 0 < hi
        raw.append(float(knn(a, b, 1)[0].median() - knn(a, tr, 1)[0].median()))
        if seed == 0:
            test = data_copying(a, b, tr, cells=10, seed=0)
            assert abs(test.ct) < 2 and abs(test.zu) < 2
    assert abs(np.mean(gaps)) < 0.03
    assert min(raw) > 0.15  # what the unmatched gap reads on the same sets


def test_a_blur_reads_as_underfitting(digits):
    tr, ho = digits
    blur = tr[torch.randint(0, len(tr), (1000,), generator=torch.Generator().manual_seed(0))]
    blur = blur + 0.6 * torch.randn(blur.shape, generator=torch.Generator().manual_seed(1))
    test = data_copying(blur, ho, tr, cells=10, seed=0)
    assert test.ct > 5 and test.copying_share == 0.0


def test_fraction_intervals_cover_a_known_copy_fraction():
    """500 samples, each an exact training copy with probability 0.3, else a fresh draw: the 95%
    interval of the memorised fraction covers 0.3 in at least 90 of 100 seeded draws."""
    gen = torch.Generator().manual_seed(0)
    tr, ho = torch.randn(400, 20, generator=gen), torch.randn(200, 20, generator=gen)
    ref = CopyReference.build(tr, ho, CopySettings(cells=None))
    covered = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(100 + seed)
        copy = torch.rand(500, generator=g) < 0.3
        x = torch.where(copy[:, None], tr[torch.randint(0, 400, (500,), generator=g)], torch.randn(500, 20, generator=g))
        lo, hi = intervals.fraction(ref.measure(x).report.ratio < 1 / 3)
        covered += lo <= 0.3 <= hi
    assert covered >= 90
    lo, hi = intervals.fraction(torch.zeros(1000, dtype=torch.bool))
    assert lo == 0.0 and hi == pytest.approx(0.00383, abs=1e-5)
    assert intervals.fraction(torch.ones(50, dtype=torch.bool))[1] == 1.0


def test_null_control_reads_near_zero_and_the_generator_does_not(digits):
    tr, ho = digits
    ref = CopyReference.build(tr, ho, CopySettings(cells=10))
    null = ref.null().summary()
    copies = ref.measure(tr[:500]).summary()
    assert abs(null["ct"]) < 2 and null["authpct"] > 40 and null["memorised_fraction"] < 0.01
    assert null["gap_lo"] < 0 < null["gap_hi"]
    assert copies["ct"] < null["ct"] - 5


@pytest.mark.parametrize("settings, heldout, match", [
    (CopySettings(cells=50), 30, "more than the 30 held-out rows"),
    (CopySettings(cells=500), 300, "more than the 400 training rows"),
])
def test_sizes_that_cannot_hold_the_cells_are_one_sentence(settings, heldout, match):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=match):
        CopyReference.build(torch.randn(400, 4, generator=gen), torch.randn(heldout, 4, generator=gen), settings)


def test_kid_bootstrap_counts_match_the_duplicate_free_mmd_computed_directly():
    """kid_interval scores a resample through counts (c'Kc - sum c^2 K_uu); the direct computation
    on the resampled rows, leaving out pairs of one row with itself, is the same number."""
    from genmem.metrics.frechet import _poly_kernel, kid, kid_interval

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(40, 5)) + 0.3
    idx, xs = rng.integers(0, 40, 30), x[:30]
    kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(y[idx], y[idx]), _poly_kernel(xs, y[idx])
    direct = (kxx.sum() - np.trace(kxx)) / (30 * 29) + kyy[idx[:, None] != idx[None, :]].mean() - 2 * kxy.mean()
    c, k, k_xy = np.bincount(idx, minlength=40).astype(float), _poly_kernel(y, y), _poly_kernel(xs, y)
    by_counts = (kxx.sum() - np.trace(kxx)) / (30 * 29) + (c @ k @ c - (c**2) @ np.diag(k)) / (900 - (c**2).sum()) \
        - 2 * (c @ k_xy.sum(0)) / 900
    assert by_counts == pytest.approx(direct, rel=1e-12)
    lo, hi = kid_interval(x, y, draws=400, subset_size=40, seed=0)
    assert lo < kid(x, y, subset_size=40, seed=0)[0] < hi and lo > -0.5


def test_fd_interval_holds_the_estimate_and_narrows_with_more_samples():
    from genmem.metrics.frechet import fd_interval, frechet_distance, gaussian_stats

    gen = torch.Generator().manual_seed(0)
    ref = gaussian_stats(torch.randn(5000, 8, generator=gen))
    widths = []
    for n in (200, 2000):
        y = torch.randn(n, 8, generator=gen) + 0.3
        lo, hi = fd_interval(y, ref, draws=200, seed=0)
        assert lo <= frechet_distance(gaussian_stats(y), ref) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(10) of it


def test_a_reference_rebuilt_from_its_state_measures_the_same(digits):
    """What depends on the training and held-out sets alone is stored (evaluation caches it) and
    reused: no neighbour search while rebuilding, and the same numbers after."""
    tr, ho = digits
    ref = CopyReference.build(tr, ho, CopySettings(cells=10))
    calls = []
    again = CopyReference.build(tr, ho, CopySettings(cells=10), search=lambda *a: calls.append(a) or knn(*a), state=ref.state())
    assert calls == []
    samples = tr[:300] + 0.1 * torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    assert again.measure(samples).summary() == ref.measure(samples).summary()

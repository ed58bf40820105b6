"""The self-consuming loop: mixing with provenance, per-generation configs, collapse detection,
and the loop itself on a real local Ray cluster (run as a two-trial Tune sweep over λ) tracked
on a real MLflow server."""

from __future__ import annotations


import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from genmem.config import DataConfig, load_config, validate
from genmem.data import ArrayDataset, load_dataset, read_shards, select, write_shards
from genmem.generative import derive_seed
from genmem.errors import ConfigError
from genmem.jobs.base import Context
from genmem.jobs.retrain import RetrainConfig, generation_config
from genmem.jobs.retrain import run as retrain_job
from genmem.methods.retraining import collapse_generation


def run_retrain(cfg: RetrainConfig) -> dict:
    return retrain_job(cfg, Context())

ROOT = Path(__file__).resolve().parents[1]


def test_selection_is_seeded_and_keeps_source_order():
    ds = ArrayDataset.from_tensors(torch.arange(100.0).reshape(50, 2), source="t")
    a, b, c = select(ds, 20, seed=5), select(ds, 20, seed=5), select(ds, 20, seed=6)
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert len(a) == 20 and torch.all(a.index[1:] > a.index[:-1])
    with pytest.raises(ValueError, match="cannot select 51 rows from 50"):
        select(ds, 51, seed=0)


def test_collapse_needs_a_sustained_rise_beyond_the_factor():
    assert collapse_generation([1.0, 0.5, 1.2, 1.6], 1.5) == 3  # a dip at 1, then two rises past 1.5x
    assert collapse_generation([1.0, 1.1, 1.2, 1.3], 1.5) is None  # rising, but never 1.5x
    assert collapse_generation([1.0, 2.0, 1.9, 2.5], 1.5) is None  # never two rises in a row past 1.5x
    assert collapse_generation([1.0, 2.0, 3.0], 1.5, patience=1) == 1


def test_collapse_needs_the_fd_interval_wholly_above_generation_0s():
    """moons at λ = 0.25 read FD 0.0024 -> 0.0081 from sampling noise alone: with intervals, a
    rise whose interval overlaps generation 0's is not a collapse."""
    fd = [0.0024, 0.0050, 0.0081]
    assert collapse_generation(fd, 1.5) == 2
    assert collapse_generation(fd, 1.5, intervals=[(0.0, 0.009), (0.001, 0.011), (0.004, 0.014)]) is None
    assert collapse_generation(fd, 1.5, intervals=[(0.001, 0.004), (0.003, 0.007), (0.006, 0.010)]) == 2


def _records(tmp_path: Path, n: int) -> list[dict]:
    return [{"checkpoint": str(tmp_path / f"ckpt{g}"), "synthetic": str(tmp_path / f"syn{g}")} for g in range(n)]


def test_generation_configs_replace_accumulate_and_fully_synthetic(tmp_path):
    base = load_config(ROOT / "configs/toy2d_retrain.yaml", cls=RetrainConfig)
    g0 = generation_config(base, "loop", 0, [])
    assert g0.data.synthetic == [] and g0.data.real and g0.init_from is None and g0.run_name == "loop-g0"
    g2 = generation_config(base, "loop", 2, _records(tmp_path, 2))
    assert g2.data.synthetic == [str(tmp_path / "syn1")] and g2.init_from == str(tmp_path / "ckpt1")
    assert g2.images == base.train.images and g2.seed != g0.seed  # same budget, fresh randomness
    acc = generation_config(base.model_copy(update={"accumulate": True}), "loop", 2, _records(tmp_path, 2))
    assert acc.data.synthetic == [str(tmp_path / "syn0"), str(tmp_path / "syn1")]
    full = generation_config(validate(RetrainConfig, {**base.model_dump(mode="json"), "synthetic_ratio": "fully_synthetic",
                                                      "warm_start": False}), "loop", 1, _records(tmp_path, 1))
    assert full.data.real is False and full.init_from is None


def test_training_set_of_a_generation_counts_and_provenance(storage):
    data = DataConfig(source="moons", n=300, train_size=100)
    real, _ = load_dataset(data)
    x = torch.randn(30, 2)
    cols = {"index": np.arange(30), "seed": np.full(30, 9), "generation": np.full(30, 1), "parent_checkpoint": np.full(30, "ck", dtype=object)}
    write_shards(storage / "syn", x, cols, source="generation:1", split="synthetic")
    mixed, _ = load_dataset(data.model_copy(update={"synthetic": [str(storage / "syn")]}))
    assert len(mixed) == 130 and int(mixed.is_synthetic.sum()) == 30 and not mixed.is_synthetic[:100].any()
    assert mixed.labels is None  # generated rows carry no labels
    assert list(mixed.meta["generation"][:100]) == [-1] * 100 and set(mixed.meta["generation"][100:]) == {1}
    assert torch.equal(mixed.x[:100], real.x)
    alone, _ = load_dataset(DataConfig(source="moons", n=300, train_size=100, synthetic=[str(storage / "syn")], real=False))
    assert len(alone) == 30 and bool(alone.is_synthetic.all())
    with pytest.raises(ConfigError, match="data.real=false leaves no training data"):
        validate(DataConfig, {"source": "moons", "real": False})


def test_bad_retrain_configs_are_refused():
    with pytest.raises(ConfigError, match="synthetic_ratio must be >= 0"):
        validate(RetrainConfig, {"synthetic_ratio": -0.5})
    with pytest.raises(ConfigError, match="synthetic_ratio"):
        validate(RetrainConfig, {"synthetic_ratio": "mostly_synthetic"})


def test_too_few_samples_per_generation_are_refused_before_ray(storage):
    cfg = load_config(ROOT / "configs/toy2d_retrain.yaml", ["samples=100", "synthetic_ratio=1.0"], cls=RetrainConfig)
    with pytest.raises(ConfigError, match="samples=100 per generation cannot supply 200 synthetic rows and 1000 evaluated samples"):
        run_retrain(cfg)
    assert not (storage / "retrain").exists() and not any((storage / "ray").iterdir())  # no loop, no Ray run


def _loops(result, store: Path) -> dict[str, dict]:
    out = {}
    for trial in result["results"]:
        state = json.loads((store / "retrain" / f"{result['sweep']}-{trial['trial_id']}" / "state.json").read_text())
        out[str(trial["params"]["synthetic_ratio"])] = state
    return out


def test_fully_synthetic_retraining_collapses_while_a_real_anchor_holds(loop_sweep):
    result, store = loop_sweep
    loops = _loops(result, store)
    assert set(loops) == {"0.25", "fully_synthetic"} and not result["failed"]
    full = [g["metrics"] for g in loops["fully_synthetic"]["generations"]]
    anchored = [g["metrics"] for g in loops["0.25"]["generations"]]
    assert len(full) == len(anchored) == 4
    # Fully synthetic: variance shrinks at every generation and MMD to held-out data grows past 2x.
    var = [m["sample_variance"] for m in full]
    assert all(b < a for a, b in zip(var, var[1:])), var
    assert var[-1] < 0.93 * var[0], var
    assert full[-1]["mmd"] > 2 * full[0]["mmd"], [m["mmd"] for m in full]
    # λ = 0.25: the real rows hold the variance within 5% of generation 0, and MMD far below.
    avar = [m["sample_variance"] for m in anchored]
    assert abs(avar[-1] - avar[0]) < 0.05 * avar[0], avar
    assert anchored[-1]["mmd"] < 0.5 * full[-1]["mmd"], ([m["mmd"] for m in anchored], [m["mmd"] for m in full])


def test_each_generation_mixes_exactly_and_records_provenance(loop_sweep):
    result, store = loop_sweep
    for ratio, state in _loops(result, store).items():
        k = 200 if ratio == "fully_synthetic" else math.floor(0.25 * 200)
        gens = state["generations"]
        assert [g["n_synthetic"] for g in gens] == [0, k, k, k]
        assert [g["n_real"] for g in gens] == ([200, 0, 0, 0] if ratio == "fully_synthetic" else [200] * 4)
        for g in gens[:-1]:  # each generation's selection feeds the next one
            syn = read_shards(g["synthetic"])
            assert len(syn) == k
            assert set(syn.meta["generation"]) == {g["generation"]}
            assert set(syn.meta["parent_checkpoint"]) == {g["checkpoint"]}
            pool = read_shards(g["samples"])
            expected = select(pool, k, derive_seed(state["config"]["seed"], 3, g["generation"]))  # the same seed, the same rows
            assert torch.equal(syn.index, expected.index) and torch.equal(syn.x, expected.x)
            assert set(np.unique(syn.meta["seed"])) == set(np.unique(pool.meta["seed"]))
        assert gens[-1]["synthetic"] is None


def test_sweep_parent_loop_and_generation_runs_in_mlflow(loop_sweep, tracking):
    result, store = loop_sweep
    client = MlflowClient(tracking)
    parent = client.get_run(result["mlflow_run_id"])
    exp = parent.info.experiment_id
    loops = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(loop.data.tags["mlflow.note.content"].startswith("3 generations at synthetic ratio ") for loop in loops)
    assert sorted(r.data.params["synthetic_ratio"] for r in loops) == ["0.25", "fully_synthetic"]
    for loop in loops:
        gens = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{loop.info.run_id}'")
        assert sorted(r.data.tags["generation"] for r in gens) == ["0", "1", "2", "3"]
        assert all("eval/fd_pixels" in r.data.metrics and "train/loss" in r.data.metrics for r in gens)
        history = client.get_metric_history(loop.info.run_id, "retrain/fd")
        assert sorted(m.step for m in history) == [0, 1, 2, 3]
        assert {"metrics_by_generation.png", "generations.json"} <= {a.path for a in client.list_artifacts(loop.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.png", "trials.json"} <= artifacts


def test_a_finished_loop_resumes_to_its_result_without_new_runs(loop_sweep, tracking, monkeypatch):
    result, store = loop_sweep
    trial = result["results"][0]
    run_name = f"{result['sweep']}-{trial['trial_id']}"
    state = json.loads((store / "retrain" / run_name / "state.json").read_text())
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("genmem/retrain").experiment_id
    before = len(client.search_runs([exp], max_results=1000))
    monkeypatch.setenv("GENMEM_STORAGE", str(store))  # the fixture's storage, for this call only
    again = run_retrain(RetrainConfig.model_validate({**state["config"], "run_name": run_name}))
    assert [g["checkpoint"] for g in again["generations"]] == [g["checkpoint"] for g in state["generations"]]
    assert again["mlflow_run_id"] == state["mlflow_run_id"]
    assert len(client.search_runs([exp], max_results=1000)) == before

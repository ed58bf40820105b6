"""`genmem sweep`: search-space checks before Ray starts, the refusal of a trial the cluster
cannot place, and a real sweep whose driver is killed mid-way and resumed with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from genmem.config import TrainConfig, load_config
from genmem.distributed.train import ray_storage
from genmem.jobs import registry
from genmem.jobs.base import Context
from genmem.jobs.retrain import RetrainConfig
from genmem.jobs.sweep import SweepConfig
from genmem.jobs.sweep import run as sweep_job
from genmem.space import SpaceError, check_space, load_space, sweep_name


def run_sweep(space, job: str, base: dict, **options) -> dict:
    return sweep_job(SweepConfig(space=str(space), job=job, base=base, **options), Context())

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "sweep-tiny",
    "data": {"source": "moons", "n": 400, "train_size": 64},
    "model": {"hidden": 32, "depth": 2},
    "sampler": {"method": "euler", "steps": 8},
    "batch_size": 32,
    "images": 32 * 150,
    "ema_halflife_images": 0,
    "log_every_images": 32 * 50,
    "checkpoint_every_images": 32 * 50,
    "grid_size": 16,
    "scaling": {"cpus_per_worker": 0.9},
}


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, job, message", [
    ("space:\n  train.optim.lrr: {grid: [0.1]}\n", "retrain", "key 'train.optim.lrr' is not a field of the retrain config: did you mean 'train.optim.lr'"),
    ("space:\n  seed: {normal: [0, 1]}\n", "train", "key 'seed' uses unknown distribution 'normal': choose one of grid, choice"),
    ("space:\n  seed: {grid: []}\n", "train", "key 'seed' has an empty grid"),
    ("space:\n  synthetic_ratio: {grid: [0.5, -1.0]}\n", "retrain", "key 'synthetic_ratio' = -1.0 is refused: synthetic_ratio must be >= 0"),
    ("space:\n  optim.lr: {loguniform: [0, 0.1]}\n", "train", "loguniform needs a positive low end"),
    ("spaces:\n  seed: {grid: [1]}\n", "train", "unknown top-level key 'spaces'"),
    ("space: {}\n", "train", "has no axes"),
    ("space: [unclosed\n", "train", "is not valid YAML (ParserError): fix its syntax"),
    ("- a list\n", "train", "must hold a mapping of keys at the top level"),
    ("space:\n  seed: {grid: [0]}\nmetric: loss\nmode: min\n", "train", "metric 'loss' is not reported by train trials: use one of train/loss"),
    ("space:\n  seed: {grid: [0, 1]}\nscheduler: {asha: {max_t: 4}}\n", "train", "ASHA scheduler needs 'metric' and 'mode'"),
])
def test_bad_spaces_are_refused_before_ray_starts(tmp_path, text, job, message):
    base = (RetrainConfig() if job == "retrain" else TrainConfig()).model_dump(mode="json")
    with pytest.raises(SpaceError) as err:
        check_space(load_space(_space(tmp_path, text)), registry.get(job), base)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0


def test_missing_space_and_config_files_are_named(tmp_path):
    from genmem.config import ConfigError

    with pytest.raises(SpaceError, match="search space .*nope.yaml does not exist: pass a YAML file such as tune_spaces/mixing_ratio.yaml"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml", cls=RetrainConfig)


def test_cli_refuses_a_bad_space_without_starting_anything(tmp_path, storage):
    space = _space(tmp_path, "space:\n  synthetic_ratio: {grid: [-0.5]}\n")
    out = subprocess.run([sys.executable, "-m", "genmem.cli", "sweep", "--space", str(space), "--job", "retrain"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "GENMEM_STORAGE": str(storage)})
    assert out.returncode == 2
    assert "synthetic_ratio must be >= 0" in out.stderr and "Traceback" not in out.stderr
    assert not (storage / "ray").exists()  # no Tune experiment, no Ray storage


def test_space_with_asha_and_random_axes(tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = load_space(_space(tmp_path, (
        "num_samples: 4\nspace:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  model.depth: {randint: [2, 5]}\n"
        "  seed: {grid: [0, 1]}\n  batch_size: {choice: [64, 128]}\nmetric: train/loss\nmode: min\n"
        "scheduler: {asha: {max_t: 8, grace_period: 2}}\n")))
    assert space.trials == 8  # the grid crossed with num_samples
    from genmem.distributed.tune import param_space, scheduler

    assert isinstance(scheduler(space), ASHAScheduler)
    params = param_space(space)
    assert isinstance(params["optim.lr"], tune.search.sample.Float) and params["seed"] == {"grid_search": [0, 1]}
    checked = check_space(space, registry.get("train"), TrainConfig().model_dump(mode="json"))
    assert {c.model.depth for c in checked} >= {2, 4}  # both ends of randint [2, 5) were validated


def test_shipped_spaces_check_against_their_jobs():
    retrain = load_config(ROOT / "configs/digits_retrain.yaml", cls=RetrainConfig).model_dump(mode="json")
    space = load_space(ROOT / "tune_spaces/mixing_ratio.yaml")
    assert space.trials == 15 and check_space(space, registry.get("retrain"), retrain)
    posterior = load_space(ROOT / "tune_spaces/posterior_scale.yaml")
    assert posterior.trials == 15 and check_space(posterior, registry.get("posterior"), {"checkpoint": "ckpt"})


def test_a_trial_the_cluster_cannot_place_is_refused_before_any_trial(tmp_path, storage, tracking, ray_local):
    space = _space(tmp_path, "space:\n  scaling.num_workers: {grid: [1, 4]}\n")
    base = TrainConfig.model_validate({**TINY, "batch_size": 32}).model_dump(mode="json")
    from genmem.errors import ClusterError

    with pytest.raises(ClusterError, match="asks for 4 workers of 0.9 CPU each .* can place only 2"):
        run_sweep(space, "train", base)
    name = sweep_name(load_space(space), "train", base)
    assert not (Path(ray_storage()) / "sweeps" / name).exists()  # no Tune experiment was created
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("genmem/train")
    assert exp is None or not client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{name}'")


def test_sweep_killed_mid_way_resumes_without_rerunning_or_duplicating(tmp_path, tracking, ray_address):
    # Four trials, two at a time, on the session's tracking stack (PostgreSQL under the MLflow
    # server): the kill comes once one has finished, and the rest run on resume. The sweep's
    # driver attaches to the session's cluster, as a driver on a long-lived cluster does: killing
    # it ends its trials there (Ray ends a dead driver's job), not the cluster.
    space = _space(tmp_path, "space:\n  seed: {grid: [0, 1, 2, 3]}\nmetric: train/loss\nmode: min\nmax_concurrent_trials: 2\n")
    config = tmp_path / "tiny.yaml"
    # Trials train in their own process (Ray Train's local mode): this test is about the sweep's
    # bookkeeping; the ASHA test below stops trials that hold worker groups.
    config.write_text(yaml.safe_dump({**TINY, "scaling": {**TINY["scaling"], "num_workers": 0}}))
    store = tmp_path / "store"
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    env.update({"GENMEM_STORAGE": str(store), "MLFLOW_TRACKING_URI": tracking, "GENMEM_RAY_STORAGE": str(store / "ray")})
    cmd = [sys.executable, "-m", "genmem.cli", "sweep", "--space", str(space), "--job", "train", "--config", str(config), "--json"]

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 420
    done_files: list[Path] = []
    while not done_files:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(1)
        done_files = list((store / "sweeps").glob("*/done/*.json"))
    os.killpg(first.pid, signal.SIGKILL)  # the sweep's driver
    first.wait()
    log.close()
    finished = {p.name: p.stat().st_mtime_ns for p in done_files}
    assert 1 <= len(finished) < 4

    out = subprocess.run([*cmd, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["trials"] == 4 and not result["failed"]
    for name, mtime in finished.items():  # finished before the kill: not run again
        assert (store / "sweeps" / result["sweep"] / "done" / name).stat().st_mtime_ns == mtime

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("genmem/train").experiment_id
    parents = client.search_runs([exp], filter_string=f"tags.sweep = '{result['sweep']}' and attributes.run_name = 'sweep-{result['sweep']}'")
    assert len(parents) == 1 and parents[0].info.run_id == result["mlflow_run_id"]
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(int(r.data.params["seed"]) for r in children) == [0, 1, 2, 3]  # one run per trial
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:  # every step once: a rerun would log the same steps again into the reopened run
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)) == 3, steps
    assert {"sweep_summary.png", "trials.json"} <= {a.path for a in client.list_artifacts(result["mlflow_run_id"])}


def test_asha_stops_a_bad_learning_rate_early_and_mlflow_marks_it(tmp_path, storage, tracking, ray_local):
    """Three training trials, one with a learning rate far too small to learn in the budget: ASHA,
    counting images seen (a report every log interval), stops it at its first rung."""
    space = _space(tmp_path, "space:\n  optim.lr: {grid: [0.003, 0.004, 1.0e-7]}\nmetric: train/loss\nmode: min\n"
                             "scheduler: {asha: {grace_period: 960, reduction_factor: 2}}\nmax_concurrent_trials: 2\n")
    base = TrainConfig.model_validate({**TINY, "log_every_images": 320, "checkpoint_every_images": 0}).model_dump(mode="json")
    result = run_sweep(space, "train", base)
    budget = TINY["images"]
    assert not result["failed"] and result["trials"] + len(result["stopped"]) == 3, result
    assert result["stopped"], "ASHA stopped no trial"
    lrs = {trial["trial_id"]: trial["params"]["optim.lr"] for trial in result["stopped"]}
    assert 1.0e-7 in lrs.values(), lrs  # the bad one is among the stopped
    for trial in result["stopped"]:
        assert trial["images_seen"] < budget, trial  # stopped before its budget
    finished = {r["params"]["optim.lr"] for r in result["results"]}
    assert 1.0e-7 not in finished and len(finished) == result["trials"]

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("genmem/train").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    killed = [r for r in children if r.info.status == "KILLED"]
    assert len(killed) == len(result["stopped"]) and all("stopped early by the ASHA scheduler at images_seen=" in r.data.tags["stopped"] for r in killed)
    assert {float(r.data.params["optim.lr"]) for r in killed} == set(lrs.values())
    assert all(r.info.status == "FINISHED" for r in children if r not in killed)

"""Training never waits on its tracking stack: genmem's own (a real `mlflow server` over a real
PostgreSQL), whose server the test kills and restarts, and whose database it restarts, while a
training run is on real Ray Train workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import start_stack
from mlflow import MlflowClient

from genmem import services
from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.distributed.train import latest_checkpoint, ray_storage
from genmem.errors import TrackingUnavailable
from genmem.runs.training import train_model
from genmem.storage import join

pytestmark = pytest.mark.slow

_LOG = 64 * 20  # images between train/loss points


def _cfg(run_name: str, images: int) -> TrainConfig:
    return TrainConfig.model_validate(dict(
        name="outage", run_name=run_name, data=dict(source="moons", n=400, train_size=256), model=dict(hidden=32, depth=2),
        batch_size=64, images=images, ema_halflife_images=0, log_every_images=_LOG, grid_size=16, sampler=dict(method="euler", steps=4),
        scaling=dict(cpus_per_worker=0.9),
    ))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tracking stack of this module's own (its server is killed, its database restarted): one
    for both tests, as its start (initdb, the server's migrations) takes about 14 s."""
    stack = start_stack(tmp_path_factory.mktemp("outage") / "tracking")
    yield stack
    services.down(stack.root)


@pytest.fixture
def server(stack, monkeypatch):
    """{uri, kill, start} of the module's MLflow server (killed without warning, started again on
    the same port), up when the test starts, and ``restart_database``."""
    services.start_mlflow(stack)  # a no-op where it answers; the test before may have left it killed

    def kill():
        os.killpg(stack.mlflow_pid, signal.SIGKILL)
        os.waitpid(stack.mlflow_pid, 0)
        stack.mlflow_pid = None

    def restart_database(away_s: float):
        services.stop_postgres(stack)
        time.sleep(away_s)
        services.start_postgres(stack)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.uri)
    return {"uri": stack.uri, "kill": kill, "start": lambda: services.start_mlflow(stack), "restart_database": restart_database}


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def _first_loss(client: MlflowClient, name: str, timeout: float = 120) -> str:
    """The run's id once its first train/loss point has arrived."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id], filter_string=f"tags.ray_run_name = '{name}'"):
                if "train/loss" in run.data.metrics:
                    return run.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"run {name} logged no train/loss in {timeout} s")


def test_steps_go_on_while_the_database_restarts_and_the_server_is_away_and_arrive_exactly_once(server, ray_local):
    cfg, client = _cfg("outage-restart", 64 * 3000), MlflowClient(server["uri"])
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(result=train_model(cfg)))
    worker.start()
    run_id = _first_loss(client, cfg.run_name)
    server["restart_database"](3)  # the server answers meanwhile, but cannot store
    assert worker.is_alive(), "training ended before the outages: give it a larger budget"
    server["kill"]()
    down = time.time()
    time.sleep(4)
    server["start"]()
    up = time.time()
    worker.join(timeout=300)
    assert not worker.is_alive() and "result" in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = list(range(_LOG, cfg.images + 1, _LOG))
    assert _steps(client, run_id) == expected  # every step, each once
    # Training went on during the outage: points were measured (timestamped by the worker) while the server was down.
    during = [m for m in client.get_metric_history(run_id, "train/loss") if down * 1000 < m.timestamp < up * 1000]
    assert during, "no training step was measured while the server was away"
    speed = {"before": [], "during": [], "after": []}  # throughput by when it was measured: a figure for the record
    for m in client.get_metric_history(run_id, "train/images_per_s"):
        speed["before" if m.timestamp <= down * 1000 else "during" if m.timestamp < up * 1000 else "after"].append(m.value)
    print(f"outage {up - down:.1f} s: {len(during)} of {len(expected)} train/loss points measured during it; median images/s "
          + ", ".join(f"{k} {sorted(v)[len(v) // 2]:.0f} ({len(v)})" for k, v in speed.items() if v))


def test_a_server_away_at_the_end_leaves_the_checkpoint_and_a_rerun_by_name_completes_the_run(server, ray_local, monkeypatch):
    monkeypatch.setenv("GENMEM_TRACKING_WAIT_S", "2")
    cfg, client = _cfg("outage-end", 64 * 3000), MlflowClient(server["uri"])
    out: dict = {}

    def train():
        try:
            train_model(cfg)
        except TrackingUnavailable as err:
            out["error"] = str(err)

    worker = threading.Thread(target=train)
    worker.start()
    run_id = _first_loss(client, cfg.run_name)
    server["kill"]()
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert out["error"].startswith(f"the MLflow tracking server {server['uri']} is still away after training: ")
    assert out["error"].endswith(f"rerunning with run_name={cfg.run_name} once the server is back completes the run")
    checkpoint = latest_checkpoint(join(ray_storage(), cfg.run_name))
    assert load_checkpoint(checkpoint).meta["images_seen"] == cfg.images  # the trained model is intact
    server["start"]()
    assert client.get_run(run_id).info.status == "RUNNING"  # left as it was, not FAILED
    # The same run name resumes the finished run in place (here with a larger budget, so it trains on).
    longer = cfg.model_copy(update={"images": cfg.images + 64 * 40})
    again = train_model(longer)
    assert again["mlflow_run_id"] == run_id and again["images_seen"] == longer.images
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id) == list(range(_LOG, longer.images + 1, _LOG))  # every step, each once

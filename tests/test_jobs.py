"""`ray job submit` of jobs/train.py against a real `ray start --head`, tracked in a real
MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path, mlflow_server):
    """A Ray head started with the CLI (own process group), dashboard on 127.0.0.1."""
    gcs, dash = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this venv's
        "GENMEM_STORAGE": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "RAY_AUTH_MODE": "token",
    }
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         # other Ray instances on this machine (the session's cluster) hold the default ports
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"

    def stop():
        stop_process_group(head, timeout=10)

    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(address + "/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # answering (401 under token auth): it is up
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray start --head did not come up: " + (tmp_path / "head.log").read_text()[-2000:]) from None
                time.sleep(0.5)
    except BaseException:
        stop()
        raise
    yield address, env
    stop()
    log.close()


def test_ray_job_submit_trains_and_tracks(ray_head, mlflow_server):
    address, env = ray_head
    argv = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            "python", "jobs/train.py", "--config", "configs/toy2d_flow.yaml",
            "--set", "images=1280", "--set", "batch_size=64", "--set", "model.hidden=32", "--set", "log_every_images=640",
            "--set", "scaling.num_workers=2", "--json"]
    for _ in range(60):  # the dashboard answers a few seconds before its job agent is up
        submit = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    result = json.loads([line for line in submit.stdout.splitlines() if line.startswith("{")][-1])
    assert result["images_seen"] == 1280 and result["num_workers"] == 2
    run = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("ray_job_id", "").startswith("raysubmit_")
    assert run.data.metrics["train/loss"] > 0

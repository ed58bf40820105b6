"""Jobs submitted to a real `ray start --head` under token auth: with Ray's own `ray job submit`
and with `genmem submit`. A job keeps its checkpoint and MLflow run outside Ray's temporary
working-dir copy, and a job whose results would be lost there refuses to run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from genmem.distributed.submit import job_client, job_defaults_problem, job_env, submit
from genmem.errors import ClusterError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUARD = ("from genmem.distributed.submit import job_defaults_problem; import sys; "
         "p = job_defaults_problem(); print(p); sys.exit(3 if p else 0)")


@pytest.fixture
def guard_project(tmp_path):
    """A project folder whose only job runs the guard."""
    (tmp_path / "project" / "jobs").mkdir(parents=True)
    (tmp_path / "project" / "jobs" / "guard.py").write_text(GUARD + "\n")
    return tmp_path / "project"


def _wait(client, submission_id: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(submission_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {submission_id} still {status}"
        time.sleep(0.5)
    return status


def test_guard_is_silent_outside_a_working_dir_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENMEM_STORAGE")
    assert job_defaults_problem() is None


def test_guard_names_what_would_be_lost(tmp_path, monkeypatch):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("GENMEM_STORAGE", "relative-store")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    problem = job_defaults_problem()
    assert "GENMEM_STORAGE=relative-store" in problem and "MLFLOW_TRACKING_URI=sqlite:///mlflow.db" in problem
    monkeypatch.setenv("GENMEM_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    problem = job_defaults_problem()
    assert "GENMEM_STORAGE=" not in problem and "MLFLOW_TRACKING_URI=sqlite:///mlflow.db" in problem
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", "http://127.0.0.1:5000"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert job_defaults_problem() is None
    monkeypatch.setenv("GENMEM_RAY_STORAGE", "ray-results")
    assert "GENMEM_RAY_STORAGE=ray-results" in job_defaults_problem()


def test_job_env_makes_locations_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("GENMEM_STORAGE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert job_env({"OTHER": "1"}, cwd=tmp_path) == {
        "OTHER": "1", "GENMEM_STORAGE": str(tmp_path / "genmem-store"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env = job_env({"GENMEM_STORAGE": "s3://bucket/x", "MLFLOW_TRACKING_URI": "sqlite:///runs/m.db", "GENMEM_RAY_STORAGE": "ray"}, cwd=tmp_path)
    assert env == {"GENMEM_STORAGE": "s3://bucket/x", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/runs/m.db",
                   "GENMEM_RAY_STORAGE": str(tmp_path / "ray")}


def test_plain_submission_refuses_and_genmem_submit_passes(ray_head, guard_project, tmp_path, monkeypatch, capsys):
    # `ray job submit --working-dir .` (Ray's own CLI) with the embedded defaults: the driver runs in Ray's copy
    argv = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(guard_project), "--no-wait",
            "--", "python", "jobs/guard.py"]
    for _ in range(60):  # the dashboard answers a few seconds before its job agent is up
        out = subprocess.run(argv, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plain = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)
    client = job_client(ray_head)
    assert _wait(client, plain) == "FAILED"
    logs = client.get_job_logs(plain)
    assert "runtime_resources/working_dir_files" in logs and "would be lost" in logs and "genmem submit" in logs

    # genmem submit from the project folder, defaults only: absolute locations beside it
    monkeypatch.chdir(guard_project)
    monkeypatch.delenv("GENMEM_STORAGE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = submit("guard", [], address=ray_head)
    assert result["status"] == "SUCCEEDED" and result["submission_id"].startswith("raysubmit_")
    assert capsys.readouterr().out.strip().splitlines()[-1] == "None"

    # a job that fails raises, naming the submission and how to read its logs
    (guard_project / "jobs" / "fail.py").write_text("raise SystemExit(5)\n")
    with pytest.raises(ClusterError, match=r"job raysubmit_\w+ ended FAILED: see its logs with .*ray job logs"):
        submit("fail", [], address=ray_head)


@pytest.mark.slow
def test_submitted_training_keeps_checkpoint_and_run(ray_head, tmp_path, monkeypatch, capsys):
    """Two Ray Train workers inside a submitted job, on a head started with `ray start`."""
    monkeypatch.chdir(tmp_path)  # relative locations are made absolute against the submitting folder
    result = submit("train", ["--config", "configs/demo.yaml", "--set", "images=1280", "--set", "log_every_images=640",
                              "--set", "grid_size=16", "--set", "scaling.num_workers=2", "--json"],
                    address=ray_head, working_dir=str(REPO),
                    env={"GENMEM_STORAGE": "store", "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert result["status"] == "SUCCEEDED"
    trained = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert trained["images_seen"] == 1280 and trained["num_workers"] == 2
    checkpoint = Path(trained["checkpoint"])
    assert checkpoint.is_relative_to(tmp_path / "store") and (checkpoint / "model.safetensors").is_file()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ray_job_id"] == result["submission_id"]
    assert run.data.metrics["train/loss"] > 0
    # artifacts beside the store, not in Ray's copy of the working directory
    assert run.info.artifact_uri.startswith(tmp_path.as_uri()), run.info.artifact_uri

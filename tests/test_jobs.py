"""Plain `ray job submit` of jobs/train.py against a real `ray start --head`, as the README
shows it: storage and tracking passed as absolute paths in the runtime env, so the checkpoint
and the MLflow run land there and not in Ray's temporary copy of the working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_job_submit_trains_and_tracks(ray_head, mlflow_server, tmp_path):
    store = tmp_path / "store"
    runtime_env = {"env_vars": {"GENMEM_STORAGE": str(store), "MLFLOW_TRACKING_URI": mlflow_server}}
    argv = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/train.py", "--config", "configs/toy2d_flow.yaml",
            "--set", "images=1280", "--set", "batch_size=64", "--set", "model.hidden=32", "--set", "log_every_images=640",
            "--set", "scaling.num_workers=2", "--json"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    for _ in range(60):  # the dashboard answers a few seconds before its job agent is up
        submit = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    result = json.loads([line for line in submit.stdout.splitlines() if line.startswith("{")][-1])
    assert result["images_seen"] == 1280 and result["num_workers"] == 2
    assert Path(result["checkpoint"]).is_relative_to(store) and (Path(result["checkpoint"]) / "meta.json").is_file()
    run = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("ray_job_id", "").startswith("raysubmit_")
    assert run.data.metrics["train/loss"] > 0

"""Shared fixtures. Heavy services (a Ray cluster, an MLflow server) are started once per session
where tests can share them, and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Keep every test's storage and tracking out of the working tree."""
    root = tmp_path_factory.mktemp("session")
    saved = {k: os.environ.get(k) for k in ("GENMEM_STORAGE", "MLFLOW_TRACKING_URI", "GENMEM_RAY_STORAGE")}
    os.environ["GENMEM_STORAGE"] = str(root / "store")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.pop("GENMEM_RAY_STORAGE", None)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A private GENMEM_STORAGE for one test."""
    root = tmp_path / "store"
    monkeypatch.setenv("GENMEM_STORAGE", str(root))
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    # Two cores: keep intra-op threads fixed so float reductions are repeatable.
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a service started with start_new_session=True and all it spawned; SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_RAY_STARTED = []


@pytest.fixture
def ray_local():
    """The session's local Ray cluster (2 CPUs), started on first use and shut down at the end.
    A test that needs another cluster shuts this one down; the next user starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        _RAY_STARTED.append(True)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    if _RAY_STARTED:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts), stopped as a
    process group. Yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not become healthy: {Path(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    stop_process_group(proc, timeout=20)
    log.close()


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    """Point this test's MLflow tracking at the session's server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server

"""`genmem tracking up|down|status`: a real PostgreSQL (the pgserver wheel's binaries) under a real
`mlflow server`, started, used, stopped and started again by the command a user runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from mlflow import MlflowClient

from genmem import services
from genmem.cli import main


def _tracking(*argv: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "genmem.cli", "tracking", *argv, "--json"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reachable(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.slow  # starts an MLflow server twice
def test_up_keeps_runs_in_postgresql_on_127_0_0_1_and_down_then_up_serves_them_again(tmp_path):
    import psycopg

    env = {**os.environ, "GENMEM_STORAGE": str(tmp_path / "store")}
    port = free_port()
    try:
        up = _tracking("up", "--port", str(port), "--workers", "1", env=env)
        root = Path(up["root"])
        assert up["tracking_uri"] == f"http://127.0.0.1:{port}" and root == tmp_path / "store" / "tracking"
        status = _tracking("status", env=env)
        assert status["mlflow"] == "running" and status["postgres"] == "running"

        client = MlflowClient(up["tracking_uri"])
        run = client.create_run(client.create_experiment("stack"))
        client.log_metric(run.info.run_id, "loss", 0.25, step=7)
        client.log_text(run.info.run_id, "hello", "note.txt")
        assert (root / "artifacts").is_dir() and list((root / "artifacts").rglob("note.txt"))  # proxied into the root

        # The run is in PostgreSQL, which listens on 127.0.0.1 only, behind the password the stack made.
        stack = services.Stack.load(root)
        password = (root / "pgpass").read_text().strip().rsplit(":", 1)[-1]
        assert oct((root / "pgpass").stat().st_mode & 0o777) == "0o600"
        with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password=password, dbname="mlflow") as db:
            assert db.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
            assert db.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()[0] == 1
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", password="guess", dbname="mlflow")
        assert password.encode() not in Path(f"/proc/{stack.mlflow_pid}/cmdline").read_bytes()  # not on a command line

        down = _tracking("down", env=env)
        assert down["stopped"] == up["tracking_uri"] and not _reachable(up["tracking_uri"])
        assert _tracking("status", env=env)["postgres"] == "stopped"

        again = _tracking("up", "--port", str(port), "--workers", "1", env=env)
        assert again["tracking_uri"] == up["tracking_uri"]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(7, 0.25)]
        assert _tracking("up", "--port", str(port), env=env)["tracking_uri"] == up["tracking_uri"]  # running: unchanged
    finally:
        _tracking("down", env=env)


def test_bad_requests_are_one_sentence_and_start_nothing(tmp_path, capsys, monkeypatch):
    root = tmp_path / "stack"
    assert main(["tracking", "up", "--root", str(root), "--backend", "external"]) == 2
    assert "backend 'external' needs --database" in capsys.readouterr().err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["tracking", "up", "--root", str(root), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is taken by another program: pass --port with a free one" in capsys.readouterr().err

    monkeypatch.setenv("GENMEM_STORAGE", "s3://bucket/store")
    assert main(["tracking", "up"]) == 2
    assert "the storage root s3://bucket/store is an object store" in capsys.readouterr().err
    assert not root.exists()  # nothing was started or written

    assert main(["tracking", "status", "--root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mlflow"] == "never started here"


MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
tmpfs /mnt/shared/scratch tmpfs rw 0 0
//nas/share /mnt/my\\040share cifs rw 0 0
"""


def test_the_file_system_of_a_path_is_its_longest_mount_point():
    from genmem.tracking import filesystem_of

    assert filesystem_of("/mnt/shared/mlflow.db", MOUNTS) == "nfs4"
    assert filesystem_of("/mnt/shared/scratch/mlflow.db", MOUNTS) == "tmpfs"
    assert filesystem_of("/mnt/sharedother/mlflow.db", MOUNTS) == "ext4"  # a prefix of the name is not a parent
    assert filesystem_of("/mnt/my share/mlflow.db", MOUNTS) == "cifs"
    assert filesystem_of("/home/u/mlflow.db", MOUNTS) == "ext4"


def test_a_sqlite_store_on_a_network_file_system_points_at_the_stack_once(tmp_path, capsys, monkeypatch):
    from genmem import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.check_reachable(uri) == uri and "warning" not in capsys.readouterr().err  # a local disk: nothing to say
    monkeypatch.setattr(tracking, "filesystem_of", lambda path, mounts=None: "nfs4")
    tracking.check_reachable(uri)
    tracking.check_reachable(uri)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"the MLflow store {uri} is a sqlite file on nfs4" in err and "genmem tracking up" in err


def test_a_sweep_of_many_trials_on_the_sqlite_store_names_the_stack():
    from genmem.jobs.sweep import SQLITE_WRITERS, many_writers_note

    assert many_writers_note("sqlite:////tmp/mlflow.db", SQLITE_WRITERS) is None
    assert many_writers_note("http://127.0.0.1:5000", 64) is None
    note = many_writers_note("sqlite:////tmp/mlflow.db", SQLITE_WRITERS + 1)
    assert note.startswith(f"[genmem sweep] {SQLITE_WRITERS + 1} trials at a time will write one sqlite file") and "genmem tracking up" in note

"""Submitting a job to a Ray cluster so that its results outlive it.

``ray job submit --working-dir .`` runs the job's driver inside Ray's temporary copy of the
working directory (``.../runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes:
the embedded defaults (``./genmem-store``, ``sqlite:///mlflow.db``) would put the checkpoint and
the MLflow run there. :func:`submit` passes absolute locations in the job's ``runtime_env``;
:func:`check_job_defaults`, called at the start of every job, refuses to run where they would be
lost.

Usage::

    submit("train", ["--config", "configs/demo.yaml"], address="http://127.0.0.1:8265")
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from genmem.errors import ClusterError, ConfigError
from genmem.storage import STORAGE_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray's folder for working-dir copies: <temp_dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>
_COPY_PARENTS = ("runtime_resources", "working_dir_files")


def _working_dir_copy(cwd: Path) -> bool:
    parts = cwd.resolve().parts
    return any(parts[i:i + 2] == _COPY_PARENTS for i in range(len(parts) - 1))


def _is_local_relative(value: str) -> bool:
    """A storage path or tracking URI that resolves against the cwd (URIs of servers and object
    stores do not)."""
    if value.startswith("sqlite:///"):
        return not value.removeprefix("sqlite:///").startswith("/")
    if value.startswith("file:"):
        return not value.removeprefix("file:").startswith("/")
    return "://" not in value and not os.path.isabs(value)


def job_defaults_problem() -> str | None:
    """One sentence when this process runs inside a Ray working-dir copy and would write its
    storage or MLflow run there (unset or relative ``GENMEM_STORAGE``, ``MLFLOW_TRACKING_URI``,
    ``GENMEM_RAY_STORAGE``); else None."""
    cwd = Path.cwd()
    if not _working_dir_copy(cwd):
        return None
    lost = []
    for var, default, what in (("GENMEM_STORAGE", "./genmem-store", "checkpoints and samples"),
                               ("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db", "the MLflow run")):
        value = os.environ.get(var)
        if not value or _is_local_relative(value):
            lost.append(f"{what} ({var}={value or default})")
    ray_storage = os.environ.get("GENMEM_RAY_STORAGE")
    if ray_storage and _is_local_relative(ray_storage):
        lost.append(f"Ray Train checkpoints (GENMEM_RAY_STORAGE={ray_storage})")
    if not lost:
        return None
    return (f"this Ray job runs in Ray's temporary copy of its working directory ({cwd}), which Ray deletes, "
            f"so {' and '.join(lost)} would be lost with it: set absolute GENMEM_STORAGE and MLFLOW_TRACKING_URI "
            "in the job's runtime_env env_vars (ray job submit --runtime-env-json "
            "'{\"env_vars\": {\"GENMEM_STORAGE\": \"/abs/genmem-store\", \"MLFLOW_TRACKING_URI\": \"sqlite:////abs/mlflow.db\"}}'), "
            "or submit with `genmem submit`, which does this")


def check_job_defaults() -> None:
    """Raise :class:`ClusterError` with :func:`job_defaults_problem`'s sentence, if any."""
    problem = job_defaults_problem()
    if problem:
        raise ClusterError(problem)


def _absolute(value: str, base: Path) -> str:
    """``value`` made absolute against ``base`` when it is a relative local path or sqlite URI."""
    if not _is_local_relative(value):
        return value
    if value.startswith("sqlite:///"):
        return f"sqlite:///{base / value.removeprefix('sqlite:///')}"
    if value.startswith("file:"):
        return (base / value.removeprefix("file:")).as_uri()
    return str(base / value)


def job_env(env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """The env_vars a submitted job needs: ``env`` plus absolute GENMEM_STORAGE,
    MLFLOW_TRACKING_URI (from ``env``, else this process's environment, else the embedded
    defaults beside ``cwd``), GENMEM_RAY_STORAGE when set, and the storage endpoint settings
    (GENMEM_CACHE, AWS_ENDPOINT_URL, region) of this process."""
    cwd = cwd or Path.cwd()
    env = env or {}
    out = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    out.update({k: str(v) for k, v in env.items()})
    defaults = {"GENMEM_STORAGE": "genmem-store", "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "GENMEM_RAY_STORAGE": None}
    for var, default in defaults.items():
        value = env.get(var) or os.environ.get(var) or default
        if value:
            out[var] = _absolute(str(value), cwd)
    return out


def _auth_headers() -> dict[str, str]:
    """The cluster token as an HTTP header when one is available (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), whatever RAY_AUTH_MODE says: Ray's client sends it
    only under RAY_AUTH_MODE=token, while `ray start --head` turns token auth on whenever
    ~/.ray/auth_token exists. A cluster without auth ignores the header."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the token may have been created or replaced since this process read it
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def job_client(address: str):
    """A ``JobSubmissionClient`` for the cluster at ``address`` that sends the cluster token
    when there is one; one sentence when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except ConnectionError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({str(exc).splitlines()[0]}): start one with "
            "`ray start --head --dashboard-host 127.0.0.1` or pass its dashboard address with --address"
        ) from None


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, address: str, patience_s: float = 60) -> str:
    # The dashboard answers a few seconds before its job agent is up after `ray start --head`.
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise ClusterError(f"Ray at {address} refused the job ({str(exc).splitlines()[0]})") from None
            time.sleep(2)


def _follow(client, submission_id: str) -> str:
    """Print the job's logs as they come; return its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except RuntimeError:  # the log stream closed early: the status still says how the job ended
        pass
    while (status := str(client.get_job_status(submission_id).value)) not in _TERMINAL:
        time.sleep(1)
    return status


def submit(job: str, args: list[str], *, address: str, working_dir: str = ".", wait: bool = True,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Submit ``python jobs/<job>.py <args...>`` to the Ray cluster at ``address`` (its dashboard
    URL) with ``working_dir`` as the job's files, and absolute storage and tracking locations
    (see :func:`job_env`) so the job's results outlive Ray's copy of ``working_dir``. On a
    remote cluster point them at shared storage and an MLflow server.

    With ``wait`` the job's logs stream to stdout until it ends; a job that does not succeed
    raises :class:`ClusterError`. Returns ``{"submission_id", "status", "address"}``.
    """
    entry = Path(working_dir) / "jobs" / f"{job}.py"
    if not entry.is_file():
        known = sorted(p.stem for p in (Path(working_dir) / "jobs").glob("*.py"))
        raise ConfigError(f"no job '{job}' in {Path(working_dir).absolute() / 'jobs'}: choose one of {', '.join(known) or 'none'}")
    client = job_client(address)
    runtime_env = {"working_dir": working_dir, "env_vars": job_env(env)}
    entrypoint = shlex.join(["python", f"jobs/{job}.py", *args])
    submission_id = _submit_with_retry(client, entrypoint, runtime_env, address)
    print(f"submitted {submission_id} to {address}: {entrypoint}", file=sys.stderr, flush=True)
    if not wait:
        return {"submission_id": submission_id, "status": str(client.get_job_status(submission_id).value), "address": address}
    status = _follow(client, submission_id)
    if status != "SUCCEEDED":
        raise ClusterError(
            f"job {submission_id} ended {status}: see its logs with `RAY_AUTH_MODE=token ray job logs {submission_id} "
            f"--address {address}` (drop RAY_AUTH_MODE=token on a cluster without token auth)"
        )
    return {"submission_id": submission_id, "status": status, "address": address}


def default_address() -> str:
    """The dashboard address from RAY_API_SERVER_ADDRESS or an http RAY_ADDRESS, else the local default."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def _submit_command(args: argparse.Namespace) -> dict[str, Any]:
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    return submit(args.job, job_args, address=args.address or default_address(), working_dir=args.working_dir,
                  wait=not args.no_wait)


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """``genmem submit [--address URL] [--working-dir DIR] [--no-wait] [--json] JOB [--] <job args>``:
    everything after JOB goes to the job (as with ``docker run IMAGE ARGS``: argparse cannot
    take options between JOB and ``--``). The subcommand returns :func:`submit`'s dict."""
    cmd = subparsers.add_parser(
        "submit", help="submit jobs/<JOB>.py to a Ray cluster; its checkpoints and MLflow run stay outside Ray's temporary copy",
        description="Submit `python jobs/JOB.py <job args>` as a Ray job with absolute GENMEM_STORAGE and "
                    "MLFLOW_TRACKING_URI (defaults: ./genmem-store and sqlite:///mlflow.db in this folder).")
    cmd.add_argument("--address", help=f"the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or {DEFAULT_ADDRESS})")
    cmd.add_argument("--working-dir", default=".", help="the folder shipped to the cluster (default: .)")
    cmd.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cmd.add_argument("job", help="a file of jobs/ without .py, e.g. train")
    cmd.add_argument("job_args", nargs=argparse.REMAINDER, help="the job's own arguments, e.g. --config configs/demo.yaml")
    cmd.set_defaults(func=_submit_command)
    return cmd

"""MLflow tracking: where runs go, one experiment per job kind, and one object that writes.

``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store ``./mlflow.db`` with artifacts in
``./mlartifacts`` beside it. Runs are addressed by id through ``MlflowClient`` (no global active
run), so a restarted Ray worker re-attaches to the run whose id its checkpoint carries, and only
the rank-0 worker (or the driver) ever writes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from genmem.config import flatten
from genmem.errors import TrackingError

EXPERIMENT_PREFIX = "genmem"
_PARAM_LIMIT = 6000  # MLflow's limit on a param value's length
KEY_TAG = "genmem_key"  # identifies a run that a resumed job must reopen, not duplicate


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').absolute()}"


def artifact_location() -> str | None:
    """Artifacts of a sqlite store live beside its database, never under the cwd (which, under
    `ray job submit`, is Ray's temporary copy of the working directory); a server decides its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer /health."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status}: check the server")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri} is not writable: set MLFLOW_TRACKING_URI or run from a writable folder")
    return uri


def _client(uri: str | None = None):
    from mlflow import MlflowClient

    if os.environ.get("GENMEM_VERBOSE", "0") != "1":  # "Creating initial MLflow database tables..."
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri or tracking_uri())


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def experiment_id(kind: str, uri: str | None = None) -> str:
    """The experiment of a job kind (``genmem/train``, ``genmem/evaluate``, ...), created once."""
    client = _client(uri)
    name = f"{EXPERIMENT_PREFIX}/{kind}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # MLflow 3's UI opens an experiment of this kind in its model-training view, not the GenAI one
        return client.create_experiment(name, artifact_location=artifact_location(), tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(kind: str, key: str, uri: str | None = None) -> str | None:
    """The id of the run of experiment ``genmem/<kind>`` tagged with ``key`` (see :meth:`Tracker.start`), if any."""
    found = _client(uri).search_runs([experiment_id(kind, uri)], filter_string=f"tags.{KEY_TAG} = '{key}'", max_results=1)
    return found[0].info.run_id if found else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ray_job_id() -> str | None:
    """The submission id when this process is the driver of a `ray job submit` job."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def default_tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    job_id = ray_job_id()
    if job_id:
        tags["ray_job_id"] = job_id
    return tags


class Tracker:
    """Writes to one MLflow run by id. Construct on the process that should write (the driver or
    rank 0); every other process gets ``Tracker.disabled()`` whose calls do nothing."""

    def __init__(self, run_id: str | None, uri: str | None = None):
        self.run_id = run_id
        self.outcome = "FINISHED"  # the status job_run closes the run with when the job returns
        self.uri = uri or tracking_uri()
        self._c = _client(self.uri) if run_id else None

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls(None)

    @classmethod
    def start(
        cls,
        kind: str,
        run_name: str,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        key: str | None = None,
        uri: str | None = None,
    ) -> "Tracker":
        """Create a run in the experiment of ``kind`` with flattened params and default tags.

        ``key`` makes the start idempotent: a run of that experiment tagged with the same key is
        reopened instead of duplicated (a resumed loop, generation or sweep trial)."""
        client = _client(uri)
        all_tags = {**default_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        exp = experiment_id(kind, uri)
        if key is not None:
            all_tags[KEY_TAG] = key
            found = client.search_runs([exp], filter_string=f"tags.{KEY_TAG} = '{key}'", max_results=1)
            if found:
                client.update_run(found[0].info.run_id, status="RUNNING")
                return cls(found[0].info.run_id, uri)
        run = client.create_run(exp, run_name=run_name, tags=all_tags)
        tracker = cls(run.info.run_id, uri)
        if params:
            tracker.params(params)
        return tracker

    @property
    def enabled(self) -> bool:
        return self._c is not None

    def params(self, params: dict[str, Any]) -> None:
        if not self._c:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._c.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._c:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._c.log_batch(self.run_id, metrics=items)

    def tags(self, tags: dict[str, Any]) -> None:
        if not self._c:
            return
        from mlflow.entities import RunTag

        self._c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def image(self, key: str, picture: np.ndarray, step: int | None = None) -> None:
        """An image by step (MLflow's image history) when a step is given, else a plain PNG."""
        if not self._c:
            return
        if step is None:
            self._c.log_image(self.run_id, picture, artifact_file=f"{key}.png")
        else:
            self._c.log_image(self.run_id, picture, key=key, step=step)

    def text(self, text: str, artifact_file: str) -> None:
        if self._c:
            self._c.log_text(self.run_id, text, artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._c:
            self._c.log_artifact(self.run_id, str(path), artifact_path)

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """A metric's (steps, values) in step order, e.g. a training run's logged curve."""
        if not self._c:
            return [], []
        points = sorted(self._c.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
        return [m.step for m in points], [m.value for m in points]

    def finish(self, status: str = "FINISHED") -> None:
        if self._c:
            self._c.set_terminated(self.run_id, status=status)


@contextmanager
def job_run(kind: str, run_name: str, *, run_id: str | None = None, **start: Any) -> Iterator[Tracker]:
    """An MLflow run open for the whole job: RUNNING from the start (``start``: the params, tags,
    parent run and key of :meth:`Tracker.start`), FINISHED when the block ends (or
    ``tracker.outcome``), FAILED (KILLED on Ctrl-C) with the error as the tag ``error`` when it
    raises, so a failed job leaves a record. ``run_id`` reopens an existing run instead."""
    if run_id:
        tracker = Tracker(run_id)
        tracker._c.update_run(run_id, status="RUNNING")
    else:
        tracker = Tracker.start(kind, run_name, **start)
    try:
        yield tracker
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            tracker.tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        finally:
            tracker.finish(status)
        raise
    tracker.finish(tracker.outcome)

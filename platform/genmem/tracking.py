"""MLflow tracking: where runs go, one experiment per job kind, and one object that writes.

``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store ``./mlflow.db`` with artifacts in
``./mlartifacts`` beside it. Runs are addressed by id through ``MlflowClient`` (no global active
run), so a restarted Ray worker re-attaches to the run whose id its checkpoint carries, and only
the rank-0 worker (or the driver) ever writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from genmem.config import BUDGET_TAG, flatten
from genmem.errors import TrackingError, TrackingUnavailable

# MLflow's telemetry thread sets and unsets an environment variable while other threads read the
# environment (requests does, for proxies, on every call): a run's creation then failed with
# KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in our suite. MLflow is only imported here, after this;
# a user who sets the variable keeps their choice.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT_PREFIX = "genmem"
_PARAM_LIMIT = 6000  # MLflow's limit on a param value's length
KEY_TAG = "genmem_key"  # identifies a run that a resumed job must reopen, not duplicate
DESCRIPTION_TAG = "mlflow.note.content"  # MLflow's run description


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
        _warn_network_sqlite(uri, folder)
    return uri


# File systems whose locking sqlite cannot trust: concurrent writers lose or corrupt writes there.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "fuse.sshfs", "9p")
_WARNED: set[str] = set()


def filesystem_of(path: str | Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (``/proc/mounts``: the longest mount point
    above it); "" where that cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target, best, kind = str(Path(path).absolute()), -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def _warn_network_sqlite(uri: str, folder: Path) -> None:
    kind = filesystem_of(folder)
    if kind in NETWORK_FILESYSTEMS and uri not in _WARNED:
        _WARNED.add(uri)
        print(f"[genmem] warning: the MLflow store {uri} is a sqlite file on {kind}, whose file locking sqlite cannot rely "
              "on (writers on several machines can corrupt it): run `genmem tracking up` (an MLflow server over PostgreSQL) "
              "and point MLFLOW_TRACKING_URI at it", file=sys.stderr, flush=True)


def _client(uri: str | None = None):
    from mlflow import MlflowClient

    if os.environ.get("GENMEM_VERBOSE", "0") != "1":  # "Creating initial MLflow database tables..."
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri or tracking_uri())


def numeric(d: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, as floats (what Tune and MLflow metrics take)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3's UI shows an experiment in its GenAI or its model-training view by the sidebar's toggle
# (kept in the browser, GenAI by default), or by this parameter of the page's URL: every link genmem
# prints carries it. The experiment's kind tag only spares the user the UI's "which kind?" prompt.
UI_VIEW = "workflowType=machine_learning"


# What an experiment's run list shows: MLflow's shared view state, kept as an experiment tag and
# opened by the URL parameter below (the view a user gets from the UI's "Share" button).
VIEW_KEY = "genmem"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
_SECTIONS = ("params", "tags", "metrics", "attributes")


def run_list_view(columns: Sequence[str]) -> str:
    """The shared view state whose run list shows each run's description, then ``columns``:
    metric keys (``eval/memorised_fraction``), ``params.<name>`` or ``tags.<name>``."""
    def key(column: str) -> str:
        section, _, name = column.partition(".")
        return f"{section}.`{name}`" if section in _SECTIONS and name else f"metrics.`{column}`"

    return json.dumps({"selectedColumns": ["attributes.`Description`", *map(key, columns)]})


def ui_address() -> str:
    """Where a user opens the MLflow UI: ``GENMEM_MLFLOW_UI`` if set, else an HTTP tracking
    server's own address, else what `make mlflow-ui` serves over the embedded store."""
    uri = os.environ.get("GENMEM_MLFLOW_UI") or tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(run_id: str, uri: str | None = None) -> str:
    """The run's page in the MLflow UI, in the model-training view."""
    experiment = _client(uri).get_run(run_id).info.experiment_id
    return f"{ui_address()}/#/experiments/{experiment}/runs/{run_id}?{UI_VIEW}"


def experiment_url(run_id: str, uri: str | None = None) -> str:
    """The run list of the run's experiment in the MLflow UI: the model-training view, with the
    columns its job chose (:func:`run_list_view`)."""
    experiment = _client(uri).get_run(run_id).info.experiment_id
    return f"{ui_address()}/#/experiments/{experiment}/runs?{UI_VIEW}&viewStateShareKey={VIEW_KEY}"


def experiment_id(kind: str, uri: str | None = None, columns: Sequence[str] = ()) -> str:
    """The experiment of a job kind (``genmem/train``, ``genmem/evaluate``, ...), created once;
    ``columns``: what its run list shows (:func:`run_list_view`), set where it differs."""
    client = _client(uri)
    name = f"{EXPERIMENT_PREFIX}/{kind}"
    tags = {EXPERIMENT_KIND_TAG: "custom_model_development"}  # spares the UI's prompt for a kind; the view is UI_VIEW's
    if columns:
        tags[VIEW_TAG] = run_list_view(columns)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(), tags=tags)
        except Exception:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if columns and exp.tags.get(VIEW_TAG) != tags[VIEW_TAG]:
        _set_experiment_tag(client, exp.experiment_id, VIEW_TAG, tags[VIEW_TAG])
    return exp.experiment_id


def _set_experiment_tag(client, experiment: str, key: str, value: str, attempts: int = 3) -> None:
    """Set an experiment tag that other processes (the trials of a sweep) may be setting at the
    same moment: the store's insert can lose that race (PostgreSQL: a unique-key violation on
    ``experiment_tag_pk``). Then the tag is read back, and written again only where it differs."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_experiment_tag(experiment, key, value)
            return
        except MlflowException:
            if client.get_experiment(experiment).tags.get(key) == value:
                return  # the other writer's value is this one
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


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
    rank 0); every other process gets ``Tracker.disabled()`` whose calls do nothing.

    ``asynchronous=True`` (the training loop's rank 0): metrics and tags go through MLflow's own
    asynchronous logging (``log_batch(synchronous=False)``), so a step never waits on the server;
    MLflow's client retries while the server is away. :meth:`flush` collects what the server
    took, sends again what it refused, and returns what is still outstanding."""

    def __init__(self, run_id: str | None, uri: str | None = None, *, asynchronous: bool = False):
        self.run_id = run_id
        self.outcome = "FINISHED"  # the status job_run closes the run with when the job returns
        self.uri = uri or tracking_uri()
        self._c = _client(self.uri) if run_id else None
        self.asynchronous = asynchronous
        self._pending: list[tuple[Any, list, list]] = []  # (MLflow's RunOperations, metrics, tags) not yet confirmed

    def _send(self, metrics: list = (), tags: list = ()) -> None:
        if not self.asynchronous:
            self._c.log_batch(self.run_id, metrics=metrics, tags=tags)
            return
        ops = self._c.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=False)
        self._pending.append((ops, list(metrics), list(tags)))

    def flush(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds for the asynchronous writes; a write MLflow gave up on
        (its retries spent) is sent again. Returns what the server has not confirmed, as
        :func:`deliver` takes it (empty: everything arrived)."""
        import concurrent.futures

        deadline = time.monotonic() + timeout
        while True:
            futures = [f for ops, _, _ in self._pending for f in getattr(ops, "_operation_futures", [])]
            concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            retry, still = [], []
            for entry in self._pending:
                fs = getattr(entry[0], "_operation_futures", [])
                if not all(f.done() for f in fs):
                    still.append(entry)
                elif any(f.exception() is not None for f in fs):
                    retry.append(entry)
            self._pending = still
            for _, metrics, tags in retry:
                self._send(metrics, tags)
            if not retry or time.monotonic() >= deadline:
                break
        return [{"metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics], "tags": [[t.key, t.value] for t in tags]}
                for _, metrics, tags in self._pending]

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
        columns: Sequence[str] = (),
    ) -> "Tracker":
        """Create a run in the experiment of ``kind`` with flattened params and default tags;
        ``columns``: what the experiment's run list shows (:func:`experiment_id`).

        ``key`` makes the start idempotent: a run of that experiment tagged with the same key is
        reopened instead of duplicated (a resumed loop, generation or sweep trial)."""
        client = _client(uri)
        all_tags = {**default_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        exp = experiment_id(kind, uri, columns)
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

        flat = flatten(params)  # a setting left unset (None, an empty list) is no param: the run list shows what was set
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in flat.items() if v is not None and v != [] and v != {}]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._c.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._c:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._send(metrics=items)

    def tags(self, tags: dict[str, Any]) -> None:
        if not self._c:
            return
        from mlflow.entities import RunTag

        self._send(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def describe(self, headline: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``): its result in one line, the
        first thing the run page and the run list show (:mod:`genmem.runs.headlines`)."""
        self.tags({DESCRIPTION_TAG: headline})

    def image(self, key: str, picture: np.ndarray, step: int | None = None) -> None:
        """An image by step (MLflow's image history) when a step is given, else a plain PNG. An
        asynchronous tracker skips it, saying so, while the server is away (an upload would wait)."""
        if not self._c:
            return
        if self.asynchronous:
            try:
                check_reachable(self.uri, timeout=2.0)
            except TrackingError as err:
                print(f"[genmem] image {key} at step {step} not logged: {err}", flush=True)
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

    def read_tags(self) -> dict[str, str]:
        """The run's tags as the server holds them (what rank 0 wrote during training)."""
        return dict(self._c.get_run(self.run_id).data.tags) if self._c else {}

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """A metric's (steps, values) in step order, e.g. a training run's logged curve."""
        if not self._c:
            return [], []
        points = sorted(self._c.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
        return [m.step for m in points], [m.value for m in points]

    def finish(self, status: str = "FINISHED") -> None:
        if self._c:
            self._c.set_terminated(self.run_id, status=status)


def deliver(run_id: str, backlog: list[dict[str, Any]], uri: str | None = None) -> int:
    """Send what a run's writer could not (:meth:`Tracker.flush`), exactly once: a metric step
    the server already holds (it arrived after all) is not sent again. Returns the values sent;
    raises :class:`TrackingUnavailable`, naming the URI, while the server is still away."""
    from mlflow.entities import Metric, RunTag

    uri = uri or tracking_uri()
    if not backlog:
        return 0
    try:
        check_reachable(uri)
    except TrackingError as err:
        raise TrackingUnavailable(str(err)) from None
    client = _client(uri)
    metrics = [Metric(k, v, ts, step) for entry in backlog for k, v, ts, step in entry["metrics"]]
    held = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in {m.key for m in metrics}}
    fresh = [m for m in metrics if m.step not in held[m.key]]
    tags = [RunTag(k, v) for entry in backlog for k, v in entry["tags"]]
    for i in range(0, len(fresh), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=fresh[i : i + 1000])
    if tags:
        client.log_batch(run_id, tags=tags)
    return len(fresh) + len(tags)


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
    except TrackingUnavailable:
        raise  # the server is away: the run stays as it is, and a rerun completes it
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            tracker.tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        finally:
            tracker.finish(status)
        raise
    tracker.finish(tracker.outcome)


@dataclass
class RunView:
    """What a finished run holds, read once: the job kind (from its experiment ``genmem/<kind>``),
    latest metrics, params and tags; ``history(key)`` reads a metric's steps on demand."""

    run_id: str
    run_name: str
    experiment: str
    kind: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    uri: str

    def history(self, key: str) -> dict[int, float]:
        """A metric by step (the latest value where a step was logged twice)."""
        return dict(zip(*Tracker(self.run_id, self.uri).history(key)))

    def point(self, metrics: dict[str, float], prefix: str = "", **fields: Any):
        """A :class:`genmem.report.Point` of this run from ``metrics`` under ``prefix`` (None where
        it measured no memorised fraction or quality), marked when over its memorisation budget."""
        from genmem.report import point

        return point(self.run_id, metrics, prefix, run_name=self.run_name, experiment=self.experiment,
                     over_budget=self.over_budget, **fields)

    @cached_property
    def over_budget(self) -> bool:
        """Whether this run, or the training run it measures (tag ``train_run_id``), went over its
        memorisation budget."""
        if self.tags.get(BUDGET_TAG) in ("over", "stopped"):
            return True
        train = self.tags.get("train_run_id")
        if not train:
            return False
        from mlflow.exceptions import MlflowException

        try:
            return _client(self.uri).get_run(train).data.tags.get(BUDGET_TAG) in ("over", "stopped")
        except MlflowException:  # the training run was deleted: nothing to mark
            return False


def _view(run, names: dict[str, str], uri: str) -> RunView:
    experiment = names.get(run.info.experiment_id, "")
    return RunView(run_id=run.info.run_id, run_name=run.info.run_name or "", experiment=experiment,
                   kind=experiment.removeprefix(f"{EXPERIMENT_PREFIX}/"), metrics=dict(run.data.metrics),
                   params=dict(run.data.params), tags=dict(run.data.tags), uri=uri)


def _descendants(client, experiment_ids: list[str], parents: list[str], depth: int = 3) -> list:
    """The runs nested under ``parents`` down to ``depth`` levels: a sweep's trials, a posterior's
    arms, a posterior trial's arms."""
    found: list = []
    for _ in range(depth):
        children = [run for parent in parents for run in client.search_runs(
            experiment_ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10000)]
        if not children:
            break
        found += children
        parents = [run.info.run_id for run in children]
    return found


def finished_runs(*, experiments: list[str] = (), sweep: str | None = None, run_ids: list[str] = (), uri: str | None = None,
                  exclude: tuple[str, ...] = ()) -> list[RunView]:
    """The FINISHED runs of genmem experiments (``genmem/posterior`` or just ``posterior``), of
    one sweep (its parent run's id: the trials' runs), or by id, each with the runs nested under
    it (a posterior's arms); all of genmem's experiments but ``exclude`` when nothing is named.
    One sentence naming what is missing, before any read."""
    from mlflow.exceptions import MlflowException

    uri = check_reachable(uri)
    client = _client(uri)
    known = {e.experiment_id: e.name for e in client.search_experiments(max_results=1000)}
    by_name = {name: eid for eid, name in known.items()}
    ids: list[str] = []
    for name in experiments:
        full = name if name in by_name else f"{EXPERIMENT_PREFIX}/{name}"
        if full not in by_name:
            raise TrackingError(f"MLflow at {uri} has no experiment '{name}': name one of "
                                f"{', '.join(sorted(n for n in by_name if n.startswith(EXPERIMENT_PREFIX + '/'))) or '(none yet)'}")
        ids.append(by_name[full])
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise TrackingError(f"MLflow at {uri} has no run '{run_id}': pass the id of a finished genmem run") from None
    if sweep is not None:
        try:
            client.get_run(sweep)
        except MlflowException:
            raise TrackingError(f"MLflow at {uri} has no sweep run '{sweep}': pass the id of a sweep's parent run") from None
    genmem_ids = [eid for eid, n in known.items() if n.startswith(EXPERIMENT_PREFIX + "/")]
    runs += _descendants(client, genmem_ids, [r.info.run_id for r in runs] + ([sweep] if sweep is not None else []))
    if not experiments and not run_ids and sweep is None:
        ids = [eid for eid, n in known.items() if n.startswith(EXPERIMENT_PREFIX + "/") and n not in exclude]
    if ids:
        runs += client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=10000)
    unique = {r.info.run_id: r for r in runs if r.info.status == "FINISHED"}
    return [_view(r, known, uri) for r in unique.values()]

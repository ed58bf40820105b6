"""Shared fixtures. Heavy services (a Ray cluster, an MLflow server) are started once per session
where tests can share them, and always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from genmem.services import free_port  # noqa: F401 (tests import it from here)

# Ray Train's controller polls its workers every 2 s by default, so every short training run here
# waited up to 2 s to start and 2 s to end; 0.2 s before any cluster starts (subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each Ray Train fit starts a preemption watcher actor (a process importing ray.train: 1.8-2.3 CPU-s
# measured per fit here) to drain workers from nodes a cloud reclaims. One machine's clusters are
# never reclaimed, and no test is about it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# As genmem.tracking does: test modules import MLflow before genmem (see the reason there).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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


# A test that starts or uses a Ray cluster or an MLflow server is a cluster test: `slow`, like the
# statistical checks marked by hand. `pytest -m "not slow"` runs the maths in a few minutes.
_CLUSTER_FIXTURES = {"ray_local", "ray_head", "mlflow_server", "tracking"}


def pytest_collection_modifyitems(config, items):
    # Tests that prove a job did no Ray work by finding Ray down run first, and the one that puts
    # its own cluster in place of the session's runs last: the session's cluster then starts once
    # instead of again after each of them (a start, and a slower first fit, each time).
    items.sort(key=lambda item: 0 if item.get_closest_marker("before_ray") else 2 if item.get_closest_marker("own_cluster") else 1)
    for item in items:
        if _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a service started with start_new_session=True and all it spawned; SIGKILL if it
    lingers. Nothing to do where the whole group has already exited (a head that failed to start)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
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
    yield start_session_ray()


def start_session_ray():
    """Start the session's cluster unless one is up (module fixtures call this too, so every
    test finds the same kind of cluster and none has to restart it)."""
    import ray

    if not ray.is_initialized():
        # With the dashboard, as a real cluster has: Ray Train cleans up a stopped trial's workers
        # through its state API. Its nodes hold the test S3 server's dummy credentials, as a real
        # cluster's nodes hold their own (genmem never ships credentials to workers), and nothing
        # else of S3: whichever test starts it, a command attached to it must bring its storage's
        # endpoint and region itself.
        saved = {k: os.environ.get(k) for k in (*S3_CREDENTIALS, *S3_SETTINGS)}
        for k in S3_SETTINGS:
            os.environ.pop(k, None)
        os.environ.update(S3_CREDENTIALS)
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        _RAY_STARTED.append(True)
    return ray


@pytest.fixture
def ray_address(ray_local):
    """The session cluster's address, for a `genmem` command run as a subprocess to attach to
    (as `ray job submit` makes a command attach to its cluster) instead of starting its own."""
    return ray_local.get_runtime_context().gcs_address


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))
    if _RAY_STARTED:
        import ray

        ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with the session's status once pytest has reported it, without the interpreter's
    teardown: one full run here printed "413 passed" and then died of a segmentation fault while
    Python finalised (exit 139, no traceback), as Ray's native threads can once their core worker
    is gone (ray-project/ray#31145). Every result and report is written before this point."""
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def start_stack(root: Path, s3_endpoint: str | None = None):
    """genmem's tracking stack (`genmem tracking up`): a real `mlflow server` over a real
    PostgreSQL (the pgserver wheel's), artifacts proxied to the S3 server at ``s3_endpoint`` where
    given, else to ``root``. Returns the :class:`genmem.services.Stack`."""
    from genmem import services

    stack = services.Stack(root=str(root), port=free_port(), workers=1)
    if s3_endpoint:
        stack.artifacts = f"s3://{S3_BUCKET}/mlartifacts/{root.name}"
        stack.extra_env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    return services.up(stack)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """The session's MLflow server, as a cluster would run it: genmem's tracking stack, PostgreSQL
    under it and artifacts proxied to the session's S3 server; stopped at the end. Yields its URI."""
    from genmem import services

    stack = start_stack(tmp_path_factory.mktemp("tracking"), s3_server)
    yield stack.uri
    services.down(stack.root)


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    """Point this test's MLflow tracking at the session's server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


BIN = Path(sys.executable).parent


def _start_head(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, int] | None:
    """One `ray start --head --block` on fresh ports; (process, dashboard address, GCS port) once
    it says "Ray runtime started." and its dashboard answers, None if it exited first."""
    gcs, dash = free_port(), free_port()
    log_path = root / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--disable-usage-stats"],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while "Ray runtime started." not in log_path.read_text():
        if head.poll() is not None or time.time() > deadline:
            stop_process_group(head, timeout=2)
            return None
        time.sleep(0.5)
    while True:
        try:
            with urllib.request.urlopen(address + "/api/version", timeout=2):
                return head, address, gcs
        except urllib.error.HTTPError:
            return head, address, gcs  # answering (401 under token auth): it is up
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                stop_process_group(head, timeout=2)
                return None
            time.sleep(0.5)


# One head per test module: two modules submitting the same working directory to one head race
# Ray's package cache (the second job's "already exists, skipping upload" package was deleted by
# the time its actors started: RuntimeEnvSetupError).
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` under token auth, as a new user gets it once ~/.ray/auth_token exists.
    The job's environment is only what the submission carries: the head's own GENMEM_STORAGE and
    MLFLOW_TRACKING_URI are removed. Its ports are picked free just before the start, and another
    process can take one meanwhile (a full run here lost the metrics port: the agent could not
    bind it and the head never came up), so a head that does not come up is started again on
    fresh ports, up to three times."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path, generate_and_save_token

    if not _get_default_token_path().exists():
        generate_and_save_token()  # what Ray's first local ray.init() does
    env = {k: v for k, v in os.environ.items() if k not in ("GENMEM_STORAGE", "MLFLOW_TRACKING_URI", "GENMEM_RAY_STORAGE")}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")  # the job's `python` is this venv's
    logs = []
    for _ in range(3):
        root = tmp_path_factory.mktemp("ray-head")
        started = _start_head(root, env)
        if started is not None:
            break
        logs.append((root / "head.log").read_text()[-1500:])
    else:
        raise RuntimeError("ray start --head did not come up in three tries: " + "\n---\n".join(logs))
    head, address, gcs = started
    try:
        yield address
    finally:
        stop_process_group(head, timeout=2)  # `ray start --block` ignores SIGTERM: waiting longer only delays the SIGKILL
        # A head stopped by signal leaves its address in ray_current_cluster; later
        # address-less lookups in this machine (Ray Train's State API polling) would wait on it.
        from ray._common.utils import get_ray_address_file

        current = Path(get_ray_address_file(None))
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()


S3_BUCKET = "genmem-test"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with bucket ``genmem-test``;
    yields its endpoint URL. Credentials are dummies moto accepts."""
    import pyarrow.fs as pafs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="testing", secret_key="testing",
                          allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield endpoint
    finally:
        stop_process_group(proc)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # dummies moto accepts
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture
def s3_storage(s3_server, tmp_path, monkeypatch):
    """GENMEM_STORAGE on a fresh prefix of the S3 server, with this test's own local mirror;
    returns the storage URI."""
    import uuid

    uri = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"
    for key, value in {"GENMEM_STORAGE": uri, "GENMEM_CACHE": str(tmp_path / "cache"), "AWS_ENDPOINT_URL": s3_server,
                       **S3_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GENMEM_RAY_STORAGE", raising=False)
    return uri


@pytest.fixture(scope="session")
def toy_checkpoint(mlflow_server):
    """A 2-layer MLP flow trained on 16 moons points (memorising), tracked on the session's server;
    shared by the posterior and report tests."""
    from genmem.config import TrainConfig
    from genmem.runs.training import train_model

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    start_session_ray()
    try:
        cfg = TrainConfig.model_validate(dict(
            name="post-toy", data=dict(source="moons", n=200, train_size=16), model=dict(hidden=32, depth=2),
            batch_size=16, images=16 * 300, ema_halflife_images=0, log_every_images=16 * 100, grid_size=16,
            sampler=dict(method="euler", steps=8), scaling=dict(num_workers=0),  # trained in this process
        ))
        checkpoint = train_model(cfg)["checkpoint"]
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = saved or ""
    return checkpoint


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    """``trained_base(tree) -> checkpoint path``: a base trained in this process (seed 0), once
    a session per training config, so tests that differ in their job and not their base share it
    (the 100,000-image digits MLP of the fine-tuning and unlearning tests)."""
    from genmem.config import TrainConfig
    from genmem.data import load_dataset
    from genmem.training import LocalReporter, train_loop

    bases: dict[str, str] = {}

    def train(tree: dict) -> str:
        cfg = TrainConfig.model_validate({**tree, "log_every_images": tree["images"], "seed": 0})
        key = cfg.model_dump_json()
        if key not in bases:
            data, _ = load_dataset(cfg.data)
            out = tmp_path_factory.mktemp("base")
            bases[key] = str(train_loop(cfg, data, LocalReporter(out, cfg.images, quiet=True)).checkpoint)
        return bases[key]

    return train


@pytest.fixture(scope="session")
def loop_sweep(tmp_path_factory, mlflow_server):
    """λ ∈ {0.25, fully synthetic} on moons with 200 real points, 3 retrained generations each,
    as one Tune sweep on the session's 2-CPU cluster (the two trials run side by side); shared by
    the retraining and report tests. Each generation trains in its trial's process (Ray Train's
    local mode): a worker group's start-up would be most of a toy generation's time."""
    from genmem.config import load_config
    from genmem.jobs.base import Context
    from genmem.jobs.retrain import RetrainConfig
    from genmem.jobs.sweep import SweepConfig
    from genmem.jobs.sweep import run as sweep_job

    root = tmp_path_factory.mktemp("loop")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "GENMEM_STORAGE")}
    os.environ.update({"MLFLOW_TRACKING_URI": mlflow_server, "GENMEM_STORAGE": str(root / "store")})
    start_session_ray()
    space = root / "lambda.yaml"
    space.write_text("space:\n  synthetic_ratio: {grid: [0.25, fully_synthetic]}\nmetric: fd\nmode: min\n")
    base = load_config(Path(__file__).resolve().parents[1] / "configs/toy2d_retrain.yaml", ["generations=3", "train.scaling.num_workers=0", "train.scaling.cpus_per_worker=0.9"], cls=RetrainConfig)
    try:
        result = sweep_job(SweepConfig(space=str(space), job="retrain", base=base.model_dump(mode="json")), Context())
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return result, root / "store"

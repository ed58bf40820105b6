"""The tracking stack for sweeps and clusters: ``mlflow server`` over PostgreSQL with proxied
artifacts, started and stopped as one (``genmem tracking up|down|status``).

The embedded default, a sqlite file that every process writes itself, serves one user's jobs on
one machine. Many writers (a sweep's trials, a cluster's drivers) and shared storage over NFS,
where sqlite's locking is unreliable, want a database server behind one MLflow server. ``up``
starts, bound to 127.0.0.1 unless ``host`` says otherwise (the MLflow server only: PostgreSQL
never listens beyond 127.0.0.1):

- PostgreSQL from the binaries the ``pgserver`` wheel ships (``pip install 'genmem[postgres]'``),
  else ``pg_ctl`` on PATH or Debian's ``postgresql``; its data in ``<root>/postgres``, password
  authentication, the password in ``<root>/pgpass`` (0600) and never on a command line;
- or no database of its own where ``database`` names one (e.g. Amazon RDS);
- ``mlflow server`` over it, artifacts proxied to ``<root>/artifacts`` or an ``s3://`` URI, so
  writers need no artifact credentials.

``<root>`` is ``<GENMEM_STORAGE>/tracking`` for a local storage root, else given. Its state is
``<root>/stack.json``; ``up`` on a running stack says so and changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genmem.errors import ConfigError, TrackingError

STATE = "stack.json"
DATABASE = "mlflow"
PG_USER = "postgres"
RUN_AS_ROOT_USER = "genmem-pg"  # PostgreSQL refuses to run as root: as root, it runs as this user


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """One tracking stack's settings and processes, as ``<root>/stack.json`` keeps them."""

    root: str
    host: str = "127.0.0.1"
    port: int = 5000
    backend: str = "postgres"  # postgres (started here) | sqlite (a file in root) | external
    database: str | None = None  # the external database's SQLAlchemy URI, password in it or in PGPASSFILE
    artifacts: str | None = None  # default <root>/artifacts
    workers: int = 4
    pg_port: int | None = None
    mlflow_pid: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # for the MLflow server's process; never saved

    @property
    def folder(self) -> Path:
        return Path(self.root)

    @property
    def pgdata(self) -> Path:
        return self.folder / "postgres"

    @property
    def pgpass(self) -> Path:
        return self.folder / "pgpass"

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def backend_uri(self) -> str:
        if self.backend == "external":
            return self.database
        if self.backend == "sqlite":
            return f"sqlite:///{self.folder / 'mlflow.db'}"
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.pg_port}/{DATABASE}"

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in asdict(self).items() if k != "extra_env"}
        (self.folder / STATE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, root: str | Path) -> "Stack | None":
        state = Path(root) / STATE
        return cls(**json.loads(state.read_text())) if state.exists() else None


def default_root() -> Path:
    """``<GENMEM_STORAGE>/tracking`` for a local storage root; a database does not live in an
    object store, so a remote root needs ``--root``."""
    from genmem.storage import is_remote, storage_uri

    uri = storage_uri()
    if is_remote(uri):
        raise ConfigError(f"the storage root {uri} is an object store, where a database cannot live: "
                          "pass --root with a local folder for the tracking stack")
    return Path(uri) / "tracking"


# --- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``: the ``pgserver`` wheel's, else
    ``pg_ctl``'s on PATH, else Debian's newest ``/usr/lib/postgresql/*/bin``."""
    spec = importlib.util.find_spec("pgserver")  # found, not imported: its import takes a lock and warns
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (shipped / "pg_ctl").exists():
            return shipped
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if debian:
        return debian[-1].parent
    raise TrackingError("no PostgreSQL found for the tracking stack: pip install 'genmem[postgres]' (its pgserver wheel "
                        "ships one), install Debian's postgresql, or pass --database with a server's URI")


def _postgres_user() -> str | None:
    """The system user PostgreSQL runs as: this one, or, as root (which PostgreSQL refuses),
    ``postgres`` where it exists, else :data:`RUN_AS_ROOT_USER`, created once."""
    if os.geteuid() != 0:
        return None
    for name in (PG_USER, RUN_AS_ROOT_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS_ROOT_USER],
                   check=True, capture_output=True, text=True)
    return RUN_AS_ROOT_USER


def _hand_to(user: str, pgdata: Path) -> None:
    """Let ``user`` own the data folder and traverse the folders above it (o+x, no listing)."""
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    for folder in pgdata.parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _as(user: str | None) -> dict:
    """subprocess's arguments that run a command as ``user`` with that user's groups only (root's
    group would otherwise stay, and a folder's group bits deny it what the others' bits allow)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _pg(tool: str, *args: str, user: str | None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(postgres_bin() / tool), *args], capture_output=True, text=True, timeout=timeout, cwd="/",
                          **_as(user))
    if proc.returncode != 0:
        raise TrackingError(f"PostgreSQL's {tool} failed ({(proc.stderr or proc.stdout).strip().splitlines()[-1:]}): "
                            f"see its log in the stack's folder")
    return proc


def _password(stack: Stack) -> str:
    """The database password, made once, kept in a libpq password file (0600) that the MLflow
    server reads through PGPASSFILE."""
    if stack.pgpass.exists():
        return stack.pgpass.read_text().strip().rsplit(":", 1)[-1]
    password = secrets.token_hex(16)
    stack.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(stack.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"127.0.0.1:*:*:{PG_USER}:{password}\n")
    return password


def _init_postgres(stack: Stack, user: str | None) -> None:
    stack.pgdata.mkdir(parents=True, exist_ok=True)
    stack.pgdata.chmod(0o700)
    if user:
        _hand_to(user, stack.pgdata)
    password = _password(stack)
    pwfile = stack.folder / "initial-password"
    pwfile.write_text(password + "\n")
    if user:
        entry = pwd.getpwnam(user)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    try:
        _pg("initdb", "-D", str(stack.pgdata), "-U", PG_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
            "--encoding=UTF8", "--locale=C", user=user)
    finally:
        pwfile.unlink(missing_ok=True)
    with open(stack.pgdata / "postgresql.conf", "a") as conf:  # TCP on 127.0.0.1 only, no Unix socket
        conf.write("\n# genmem tracking stack\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")


def postgres_running(stack: Stack) -> bool:
    if stack.backend != "postgres" or not (stack.pgdata / "PG_VERSION").exists():
        return False
    return subprocess.run([str(postgres_bin() / "pg_ctl"), "status", "-D", str(stack.pgdata)], capture_output=True, cwd="/",
                          **_as(_postgres_user())).returncode == 0


def start_postgres(stack: Stack) -> None:
    """Start the stack's PostgreSQL (initialising its data folder the first time) and make sure
    the MLflow database exists. Waits until it accepts connections."""
    user = _postgres_user()
    if not (stack.pgdata / "PG_VERSION").exists():
        _init_postgres(stack, user)
    if postgres_running(stack):
        return
    stack.pg_port = stack.pg_port or free_port()
    stack.save()
    _pg("pg_ctl", "start", "-D", str(stack.pgdata), "-w", "-t", "60", "-l", str(stack.pgdata / "server.log"),
        "-o", f"-p {stack.pg_port}", user=user)
    _ensure_database(stack)


def _ensure_database(stack: Stack) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=stack.pg_port, user=PG_USER, password=_password(stack), dbname="postgres",
                         autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')


def stop_postgres(stack: Stack) -> None:
    if postgres_running(stack):
        _pg("pg_ctl", "stop", "-D", str(stack.pgdata), "-m", "fast", "-w", "-t", "60", user=_postgres_user())


# --- the MLflow server ----------------------------------------------------------------------------


def _healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` is a running MLflow server (not a process that reused the number)."""
    if not pid:
        return False
    try:
        return b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def mlflow_running(stack: Stack) -> bool:
    return _alive(stack.mlflow_pid)


def start_mlflow(stack: Stack, timeout: float = 180) -> None:
    """Start ``mlflow server`` over the stack's database, in its own process group; returns once
    it answers /health. The database URI and password go through the environment."""
    if mlflow_running(stack):
        return
    artifacts = stack.artifacts or str(stack.folder / "artifacts")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **stack.extra_env,  # no GenAI jobs: a process fewer
           "MLFLOW_BACKEND_STORE_URI": stack.backend_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    if stack.backend == "postgres":
        env["PGPASSFILE"] = str(stack.pgpass)
    with open(stack.folder / "mlflow.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifacts,
             "--host", stack.host, "--port", str(stack.port), "--workers", str(stack.workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=stack.folder)
    stack.mlflow_pid = proc.pid
    stack.save()  # `down` finds it, whoever started it
    deadline = time.monotonic() + timeout
    while not _healthy(stack.uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc.pid)
            tail = (stack.folder / "mlflow.log").read_text()[-1500:]
            raise TrackingError(f"mlflow server on {stack.uri} did not start (log {stack.folder / 'mlflow.log'}): {tail}")
        time.sleep(0.5)


def _kill_group(pid: int, timeout: float = 20) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it where this process started it
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def stop_mlflow(stack: Stack) -> None:
    if mlflow_running(stack):
        _kill_group(stack.mlflow_pid)
    stack.mlflow_pid = None
    stack.save()


# --- the stack ------------------------------------------------------------------------------------


def up(stack: Stack) -> Stack:
    """Start what is not running of ``stack`` (a stack already in its root keeps its settings),
    save its state, and return it."""
    known = Stack.load(stack.root)
    if known is not None:
        if (known.backend, known.port, known.host) != (stack.backend, stack.port, stack.host) and mlflow_running(known):
            raise ConfigError(f"a tracking stack already runs from {stack.root} on {known.uri} ({known.backend}): "
                              "use it, or `genmem tracking down` first")
        stack.pg_port, stack.mlflow_pid = known.pg_port, known.mlflow_pid
    if stack.backend == "external" and not stack.database:
        raise ConfigError("backend 'external' needs --database with the database's SQLAlchemy URI")
    if not mlflow_running(stack) and not _port_free(stack.host, stack.port):
        raise ConfigError(f"port {stack.port} on {stack.host} is taken by another program: pass --port with a free one")
    if stack.backend == "postgres":
        postgres_bin()  # found before anything is written
    stack.folder.mkdir(parents=True, exist_ok=True)
    stack.save()
    started_database = stack.backend == "postgres" and not postgres_running(stack)
    if stack.backend == "postgres":
        start_postgres(stack)
    try:
        start_mlflow(stack)
    except BaseException:
        if started_database:  # nothing left running by a start that failed
            stop_postgres(stack)
        raise
    return stack


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` (as servers do, ignoring a closed one's TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def down(root: str | Path) -> Stack | None:
    """Stop the stack kept in ``root`` (the MLflow server, then PostgreSQL); its data stays."""
    stack = Stack.load(root)
    if stack is None:
        return None
    stop_mlflow(stack)
    if stack.backend == "postgres":
        stop_postgres(stack)
    return stack


def status(root: str | Path) -> dict[str, object]:
    stack = Stack.load(root)
    if stack is None:
        return {"root": str(root), "mlflow": "never started here"}
    return {"root": str(root), "tracking_uri": stack.uri, "backend": stack.backend,
            "mlflow": "running" if mlflow_running(stack) and _healthy(stack.uri) else "stopped",
            **({"postgres": "running" if postgres_running(stack) else "stopped", "postgres_port": stack.pg_port}
               if stack.backend == "postgres" else {})}


# --- the command ----------------------------------------------------------------------------------


def add_tracking_parser(sub) -> None:
    cmd = sub.add_parser("tracking", help="start or stop a local MLflow server over PostgreSQL for sweeps and clusters",
                         description=__doc__.split("\n\n")[0])
    actions = cmd.add_subparsers(dest="action", required=True)
    start = actions.add_parser("up", help="start the stack (PostgreSQL, then mlflow server) and print its URI")
    start.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    start.add_argument("--host", default="127.0.0.1", help="the MLflow server's address (default 127.0.0.1; "
                       "a cluster's head gives its private address so workers reach it)")
    start.add_argument("--backend", choices=["postgres", "sqlite", "external"], default="postgres",
                       help="the store under the server (default postgres, started here)")
    start.add_argument("--database", help="with --backend external: the database's SQLAlchemy URI, e.g. an RDS instance's")
    start.add_argument("--artifacts", help="where the server keeps artifacts (default <root>/artifacts; s3://bucket/prefix)")
    start.add_argument("--workers", type=int, default=4, help="the server's worker processes (default 4)")
    for action in (start, actions.add_parser("down", help="stop the stack; its data stays"),
                   actions.add_parser("status", help="say what of the stack runs")):
        action.add_argument("--root", help="the stack's folder (default <GENMEM_STORAGE>/tracking)")
        action.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cmd.set_defaults(func=tracking_command)


def tracking_command(args: argparse.Namespace) -> dict[str, object]:
    root = Path(args.root).absolute() if args.root else default_root()
    if args.action == "down":
        stack = down(root)
        return {"root": str(root), "stopped": stack.uri if stack else "nothing was started here"}
    if args.action == "status":
        return status(root)
    stack = up(Stack(root=str(root), host=args.host, port=args.port, backend=args.backend, database=args.database,
                     artifacts=args.artifacts, workers=args.workers))
    return {"tracking_uri": stack.uri, "backend": stack.backend, "root": str(root),
            "use": f"export MLFLOW_TRACKING_URI={stack.uri}"}

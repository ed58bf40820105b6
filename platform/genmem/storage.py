"""The storage root for datasets, checkpoints and samples, and the one way to write into it atomically.

One root, ``$GENMEM_STORAGE`` (default ``./genmem-store``): a local path (``file://`` allowed),
or a URI that ``pyarrow.fs`` opens (``s3://bucket/prefix``, ``gs://...``; an S3-compatible
server through the standard ``AWS_ENDPOINT_URL``). On a cluster it is shared storage, so every
node sees the same datasets and checkpoints.

With a remote root, genmem works on a local mirror of it under ``$GENMEM_CACHE`` (default
``~/.cache/genmem``, one folder per scheme and bucket): every atomic write below publishes
locally, then uploads (write-through); :func:`pull` brings a file or folder down when the local
copy is missing or stale. Object stores have no folder rename, so a published folder's files go
up first and its ``_SUCCESS`` marker (a fresh token) last: a reader takes a remote folder only
once its marker is there, and re-downloads it when the marker's token changed. Paths a person
or another node reads (results, tags, configs) are written as URIs (:func:`uri_of`).

Every file and folder genmem publishes is written beside its target under a hidden temporary name
and renamed into place, so a reader (another Ray worker, a restarted job) sees the old content or
the new, never half of either. Replacing an existing folder takes two renames (old aside, new in)
and only then deletes the old one: a failure between the two leaves the old content in place or
at its aside name, never lost.

Usage::

    with atomic_folder(storage_root() / "checkpoints" / "step-100") as tmp:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "meta.json").write_text(meta)
    atomic_write_text(storage_root() / "summary.json", json.dumps(summary))
    folder = pull("s3://bucket/genmem/samples/run-1")   # a local copy to read
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from genmem.errors import StorageError

MARKER = "_SUCCESS"  # last object of a folder published to a remote store; holds a fresh token
_URI = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")
_TEMP = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}$")  # the names _beside gives: never uploaded
# Passed on to Ray workers and submitted jobs, so they open the same store (secrets are not:
# a cluster carries its own credentials).
STORAGE_ENV = ("GENMEM_STORAGE", "GENMEM_RAY_STORAGE", "GENMEM_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


def is_remote(location: str | Path) -> bool:
    """True for a URI such as ``s3://bucket/key`` (``file://`` is local)."""
    m = _URI.match(str(location))
    return m is not None and m.group(1) != "file"


def _local(location: str | Path) -> str:
    text = str(location)
    return str(Path(text.removeprefix("file://")).absolute())


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (``Path`` would fold ``s3://`` to ``s3:/``)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(_local(location), *parts))


def cache_root() -> Path:
    """The local mirror of remote storage: ``$GENMEM_CACHE``, default ``~/.cache/genmem``."""
    return Path(os.environ.get("GENMEM_CACHE") or Path.home() / ".cache" / "genmem").absolute()


def local_path(location: str | Path) -> Path:
    """The local path genmem reads and writes for ``location``: itself, or its mirror if remote."""
    if not is_remote(location):
        return Path(_local(location))
    scheme, rest = _URI.match(str(location)).groups()
    return cache_root().joinpath(scheme, *[p for p in rest.split("/") if p])


def uri_of(path: str | Path) -> str:
    """The name of ``path`` that every node understands: the URI of a mirror path, else the path."""
    if is_remote(path):
        return str(path)
    path = Path(_local(path))
    try:
        rel = path.relative_to(cache_root())
    except ValueError:
        return str(path)
    return f"{rel.parts[0]}://{'/'.join(rel.parts[1:])}" if len(rel.parts) > 1 else str(path)


def storage_uri() -> str:
    """``$GENMEM_STORAGE`` as an absolute path or a URI."""
    value = os.environ.get("GENMEM_STORAGE") or "genmem-store"
    return value if is_remote(value) else _local(value)


def storage_root() -> Path:
    """The local folder of the storage root: the root itself, or its mirror when remote."""
    return local_path(storage_uri())


def storage_env() -> dict[str, str]:
    """The environment a worker or a submitted job needs to open the same storage."""
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    env["GENMEM_STORAGE"] = storage_uri()
    return env


@functools.lru_cache(maxsize=16)
def _filesystem(root: str, endpoint: str | None) -> pafs.FileSystem:
    del endpoint  # part of the cache key only: pyarrow reads AWS_ENDPOINT_URL itself
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StorageError(f"cannot open storage {root} ({exc}): check the URI, the endpoint (AWS_ENDPOINT_URL) and credentials") from None


def remote(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) of a remote URI, the filesystem cached per bucket."""
    scheme, rest = _URI.match(uri).groups()
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")


def _counterpart(path: Path) -> tuple[pafs.FileSystem, str] | None:
    """The remote object behind a mirror path; None for a local store or a temporary name."""
    uri = uri_of(path)
    if not is_remote(uri) or any(_TEMP.match(part) for part in Path(path).parts):
        return None
    return remote(uri)


def check_storage(location: str | Path, what: str = "GENMEM_STORAGE") -> None:
    """Prove ``location`` (a path or a URI) can be written, or say so in one sentence."""
    if not is_remote(location):
        ensure_writable(Path(_local(location)))
        return
    fs, path = remote(str(location))
    probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"storage {location} cannot be written ({str(exc).splitlines()[0]}): create the bucket, "
                           f"or fix {what} and the AWS_* settings") from None


def ensure_writable(path: Path) -> Path:
    """Create ``path`` and prove it can be written to, or say so in one sentence."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageError(
            f"storage path {path} is not writable ({exc.strerror}): set GENMEM_STORAGE to a writable folder"
        ) from None
    return path


def _beside(target: Path, kind: str) -> Path:
    """A hidden, unique name in ``target``'s folder: renames within one folder are atomic."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"


def _failed(action: str, path: Path, exc: BaseException) -> StorageError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(f"could not {action} {uri_of(path)} ({reason}): check the storage server, bucket and credentials")


def _upload(src: Path, fs: pafs.FileSystem, dest: str) -> None:
    with open(src, "rb") as f, fs.open_output_stream(dest) as out:
        shutil.copyfileobj(f, out, 1 << 22)


def push(path: str | Path) -> None:
    """Upload a just-published mirror file or folder to the remote store; nothing for a local store.

    A folder's remote marker goes first and comes back last: a reader meanwhile finds no marker
    and waits for (or rebuilds) the folder rather than reading half of it."""
    path = Path(path)
    target = _counterpart(path)
    if target is None:
        return
    fs, dest = target
    try:
        if not path.is_dir():
            _upload(path, fs, dest)
            return
        fs.delete_dir_contents(dest, missing_dir_ok=True)
        # JSON (manifests, meta) after the data it describes, the marker last.
        for f in sorted((p for p in path.rglob("*") if p.is_file() and p.name != MARKER), key=lambda p: (p.suffix == ".json", str(p))):
            _upload(f, fs, f"{dest}/{f.relative_to(path).as_posix()}")
        (path / MARKER).write_text(uuid.uuid4().hex)
        _upload(path / MARKER, fs, f"{dest}/{MARKER}")
    except (OSError, pa.ArrowException) as exc:
        raise _failed("upload", path, exc) from None


def _download(fs: pafs.FileSystem, src: str, dest: Path, info: pafs.FileInfo) -> None:
    with _local_file(dest) as tmp:
        with fs.open_input_stream(src) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 22)
        if info.mtime_ns is not None:
            os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))


def _read_marker(fs: pafs.FileSystem, folder: str) -> str | None:
    try:
        with fs.open_input_stream(f"{folder}/{MARKER}") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def _needs_marker(local: Path) -> bool:
    """Folders genmem publishes in its store carry a marker; without it one is not there (yet).
    Ray's run folders, staging folders (hidden names) and anything outside the store do not."""
    try:
        rel = local.relative_to(storage_root())
    except ValueError:
        return False
    ray = os.environ.get("GENMEM_RAY_STORAGE") or join(storage_uri(), "ray")
    return not (is_remote(ray) and uri_of(local).startswith(ray.rstrip("/") + "/")) and not any(p.startswith(".") for p in rel.parts)


def _pull_folder(fs: pafs.FileSystem, src: str, local: Path) -> None:
    """A marked folder is re-downloaded whole when its token changed; an unmarked one (a user's
    upload, Ray's checkpoints, parts written by several tasks) gains the files it lacks, unless
    it is one genmem publishes with a marker: then it is half written, and stays remote."""
    token = _read_marker(fs, src)
    if token is not None and local.is_dir() and (local / MARKER).is_file() and (local / MARKER).read_text() == token:
        return
    if token is None and _needs_marker(local):
        return
    infos = [i for i in fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    if token is None:
        for info in infos:
            dest = local / info.path[len(src) + 1:]
            if not dest.exists():
                _download(fs, info.path, dest, info)
        return
    staging = _beside(local, "tmp")
    try:
        for info in infos:
            _download(fs, info.path, staging / info.path[len(src) + 1:], info)
        _publish_local(staging, local, replace=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pull(location: str | Path) -> Path:
    """The local path of ``location`` (a path, a mirror path or a URI), brought down from the
    remote store when missing or stale; a location that does not exist anywhere comes back as its
    local path, for the caller's own "not found" message."""
    local = local_path(location)
    target = _counterpart(local)
    if target is None:
        return local
    fs, src = target
    try:
        info = fs.get_file_info(src)
        if info.type == pafs.FileType.File:
            stat = local.stat() if local.is_file() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != (info.size, info.mtime_ns):
                _download(fs, src, local, info)
        elif info.type == pafs.FileType.Directory:
            _pull_folder(fs, src, local)
    except (OSError, pa.ArrowException) as exc:
        raise _failed("download", local, exc) from None
    return local


def listdir(location: str | Path) -> list[str]:
    """Names in folder ``location`` (local or remote; a missing folder has none)."""
    local = local_path(location)
    target = _counterpart(local)
    names = {p.name for p in local.iterdir()} if local.is_dir() else set()
    if target is not None:
        fs, path = target
        try:
            names |= {Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
        except (OSError, pa.ArrowException) as exc:
            raise _failed("list", local, exc) from None
    return sorted(n for n in names if not _TEMP.match(n) and n != MARKER)


def remove(location: str | Path) -> None:
    """Delete a file or folder here and, under a remote store, there."""
    local = local_path(location)
    target = _counterpart(local)
    shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
    if target is not None:
        fs, path = target
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def _publish_local(staging: str | Path, target: str | Path, *, replace: bool = True) -> bool:
    """Rename ``staging`` to ``target`` on this machine (see :func:`publish_folder`); False when
    ``replace=False`` and another process published ``target`` first."""
    staging, target = Path(staging), Path(target)
    if not replace:
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True
    old = None
    if os.path.lexists(target):
        old = _beside(target, "old")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException as exc:
        if old is not None:
            try:
                os.rename(old, target)
            except OSError:
                raise StorageError(
                    f"could not move {staging} to {target} ({exc!r}) nor put the previous {target} back: "
                    f"it is kept at {old}; rename it back"
                ) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def publish_folder(staging: str | Path, target: str | Path, *, replace: bool = True) -> Path:
    """Make the complete folder ``staging`` become ``target``; ``staging`` is gone afterwards.

    An existing ``target`` is renamed aside, ``staging`` renamed in, and only then is the old
    folder deleted. If the second rename fails the old folder is put back (or, if even that
    fails, left at its aside name, which the raised error names). With ``replace=False`` a
    ``target`` that already exists, e.g. published meanwhile by another Ray worker building the
    same content, wins and ``staging`` is dropped.

    Under a remote store the folder is then uploaded (its ``_SUCCESS`` marker last).

    ``staging`` must sit on the same filesystem as ``target`` (beside it, or in the same storage
    root), as a folder filled by several processes before one of them publishes it.

    Usage::

        write_part(staging, rank, x)          # on every worker
        publish_folder(staging, out)          # once, after all parts are written
    """
    if _publish_local(staging, target, replace=replace):
        push(target)
    return Path(target)


@contextmanager
def atomic_folder(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``target`` that becomes ``target`` only if the block succeeds.

    A crash or error leaves the old ``target`` (if any) untouched and no half-written folder
    that a later read could take as valid; the temp folder is removed. With ``replace=False`` a
    ``target`` published meanwhile by another process wins and ours is dropped.

    Usage::

        with atomic_folder(folder) as tmp:
            pq.write_table(table, tmp / "part-00000.parquet")
            (tmp / "manifest.json").write_text(manifest.to_json())
    """
    target = Path(target)
    tmp = _beside(target, "tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_folder(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _local_file(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside ``path`` for a writer that wants a path (``pq.write_table``,
    ``save_file``); it replaces ``path`` in one ``os.replace`` only if the block succeeds (and
    is then uploaded under a remote store: one object put, atomic too)."""
    path = Path(path)
    with _local_file(path) as tmp:
        yield tmp
    push(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new, never half."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))

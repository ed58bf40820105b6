"""The storage root for datasets, checkpoints and samples, and the one way to write into it atomically.

One root, ``$GENMEM_STORAGE`` (default ``./genmem-store``), a local path here; on a cluster it
points at shared storage (NFS) so every node sees the same datasets and checkpoints.

Every file and folder genmem publishes is written beside its target under a hidden temporary name
and renamed into place, so a reader (another Ray worker, a restarted job) sees the old content or
the new, never half of either. Replacing an existing folder takes two renames (old aside, new in)
and only then deletes the old one: a failure between the two leaves the old content in place or
at its aside name, never lost.

Usage::

    with atomic_folder(root / "checkpoints" / "step-100") as tmp:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "meta.json").write_text(meta)
    atomic_write_text(root / "summary.json", json.dumps(summary))
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genmem.errors import StorageError


def storage_root() -> Path:
    return Path(os.environ.get("GENMEM_STORAGE", "genmem-store")).absolute()


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


def publish_folder(staging: str | Path, target: str | Path, *, replace: bool = True) -> Path:
    """Make the complete folder ``staging`` become ``target``; ``staging`` is gone afterwards.

    An existing ``target`` is renamed aside, ``staging`` renamed in, and only then is the old
    folder deleted. If the second rename fails the old folder is put back (or, if even that
    fails, left at its aside name, which the raised error names). With ``replace=False`` a
    ``target`` that already exists, e.g. published meanwhile by another Ray worker building the
    same content, wins and ``staging`` is dropped.

    ``staging`` must sit on the same filesystem as ``target`` (beside it, or in the same storage
    root), as a folder filled by several processes before one of them publishes it.

    Usage::

        write_part(staging, rank, x)          # on every worker
        publish_folder(staging, out)          # once, after all parts are written
    """
    staging, target = Path(staging), Path(target)
    if not replace:
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        return target
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
    return target


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
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside ``path`` for a writer that wants a path (``pq.write_table``,
    ``save_file``); it replaces ``path`` in one ``os.replace`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new, never half."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))

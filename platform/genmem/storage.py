"""The storage root for datasets, checkpoints and samples.

One root, ``$GENMEM_STORAGE`` (default ``./genmem-store``), a local path here; on a cluster it
points at shared storage (NFS) so every node sees the same datasets and checkpoints.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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
        raise PermissionError(
            f"storage path {path} is not writable ({exc.strerror}): set GENMEM_STORAGE to a writable folder"
        ) from None
    return path

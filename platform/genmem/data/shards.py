"""Parquet shards with a manifest: the on-disk form of every dataset and sample set.

A folder holds ``part-00000.parquet, ...`` and ``manifest.json``. Column ``x`` is a
``fixed_size_list<float32>`` of the flattened sample; ``label``, ``index``, ``is_synthetic`` and
any provenance columns (model_id, seed, ...) sit beside it. The per-sample shape is also in the
Parquet schema metadata, so a single part file handed to someone reads without the manifest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..storage import atomic_file, atomic_folder, local_path, publish_folder, pull
from .dataset import ArrayDataset, Manifest, content_hash
from .errors import DataError, DataNotFoundError

SHAPE_KEYS = (b"genmem.shape", b"shape")  # ours first; a plain "shape" key from other writers is accepted
_KNOWN = ("x", "label", "index", "is_synthetic")


def _table(x: torch.Tensor, columns: dict[str, Any] | None) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The Arrow table of ``x`` (n, *shape) and its per-row columns, shape in the schema metadata."""
    x = x.detach().cpu().to(torch.float32).contiguous()
    if x.ndim < 2:
        raise DataError(f"write_shards needs x shaped (n, *sample_shape), got shape {tuple(x.shape)}: add a feature axis")
    n, shape = x.shape[0], tuple(x.shape[1:])
    cols = {name: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for name, v in (columns or {}).items()}
    for name, col in cols.items():
        if name == "x" or col.ndim != 1 or len(col) != n:
            raise DataError(f"column '{name}' must be 1-D with one value per row of x ({n}) and not named x")
    cols.setdefault("index", np.arange(n))
    for name in ("label", "index"):
        if name in cols:
            cols[name] = cols[name].astype(np.int64)
    arrays = {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.numpy().reshape(-1)), math.prod(shape))}
    for name, col in cols.items():
        try:
            arrays[name] = pa.array(col)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"column '{name}' cannot be stored in Parquet ({exc}): pass numbers, bools or strings") from None
    return pa.table(arrays).replace_schema_metadata({SHAPE_KEYS[0]: json.dumps(list(shape))}), cols


def write_shards(
    folder: str | Path,
    x: torch.Tensor,
    columns: dict[str, Any] | None = None,
    *,
    source: str,
    split: str,
    extra: dict[str, Any] | None = None,
    rows_per_shard: int = 50_000,
) -> Manifest:
    """Write ``x`` (n, *shape) and per-row ``columns`` to ``folder`` atomically; return the manifest.

    ``columns`` may hold ``label`` and ``index`` (default 0..n-1), ``is_synthetic`` and any
    provenance columns; each needs one value per row. An existing ``folder`` is replaced.
    """
    table, cols = _table(x, columns)
    labels = torch.from_numpy(cols["label"]) if "label" in cols else None
    manifest = Manifest(len(x), tuple(x.shape[1:]), "float32", content_hash(x, labels), source, split, extra or {})
    with atomic_folder(Path(folder)) as tmp:
        # At least one part, so an empty split still carries its schema.
        for part, start in enumerate(range(0, max(len(x), 1), rows_per_shard)):
            pq.write_table(table.slice(start, rows_per_shard), tmp / f"part-{part:05d}.parquet")
        (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest


def write_part(staging: str | Path, part: int, x: torch.Tensor, columns: dict[str, Any] | None = None) -> Path:
    """One shard of a set written by several processes into ``staging``; :func:`seal_shards`
    later publishes the folder with its manifest."""
    table, _ = _table(x, columns)
    path = local_path(staging) / f"part-{part:05d}.parquet"
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def seal_shards(staging: str | Path, folder: str | Path, *, source: str, split: str, extra: dict[str, Any] | None = None) -> Manifest:
    """Give the parts in ``staging`` their manifest (content hash over all rows, in part order)
    and publish them as ``folder`` (:func:`genmem.storage.publish_folder`: an existing ``folder``
    is replaced only once the new one is in place)."""
    ds = read_shards(staging)  # under a remote store, parts other nodes wrote come down first
    manifest = Manifest(len(ds), ds.shape, "float32", ds.manifest.sha256, source, split, extra or {})
    (Path(staging) / "manifest.json").write_text(manifest.to_json())
    publish_folder(staging, folder)
    return manifest


def read_shards(folder: str | Path) -> ArrayDataset:
    """Read a shard folder written by :func:`write_shards`, or any Parquet file/folder with an ``x`` column.

    With a ``manifest.json`` the rows are checked against its sha256. Without one, the
    per-sample shape comes from the schema metadata, else each row of ``x`` is a vector.
    """
    name, path = folder, pull(folder)  # a URI, or a folder of a remote store, is read from its local mirror
    if not path.exists():
        raise DataNotFoundError(f"Parquet file or folder does not exist: {name}: check the path")
    manifest = _read_manifest(path / "manifest.json") if (path / "manifest.json").is_file() else None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataNotFoundError(f"folder {path} holds no .parquet files: point at a Parquet file or a folder of them")
    table = pa.concat_tables([_read_table(f) for f in files])
    if "x" not in table.column_names:
        raise DataError(
            f"Parquet data {path} has no 'x' column (it has {table.column_names}): "
            "store each flattened sample in a column named x"
        )
    x = _read_x(table.column("x"), manifest.shape if manifest else _shape_from(table.schema), path)
    labels = _int_column(table, "label", path)
    index = _int_column(table, "index", path)
    index = torch.arange(len(x)) if index is None else index
    synthetic = None
    if "is_synthetic" in table.column_names:
        synthetic = torch.from_numpy(table.column("is_synthetic").to_numpy()).bool()
    meta = {name: table.column(name).to_numpy() for name in table.column_names if name not in _KNOWN}
    if manifest is None:
        sha = content_hash(x, labels)
        manifest = Manifest(len(x), tuple(x.shape[1:]), "float32", sha, "parquet", "all", {"path": str(path)})
    elif manifest.n != len(x) or manifest.sha256 != content_hash(x, labels):
        raise DataError(
            f"dataset {path} does not match its manifest (its rows or sha256 changed): delete the folder to rebuild it"
        )
    return ArrayDataset(x, labels, index, manifest, synthetic, meta)


def _read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        reason = exc.__class__.__name__
        raise DataError(f"manifest {path} is unreadable ({reason}): delete the folder to rebuild it") from None


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{path} is not a readable Parquet file ({reason}): re-export it") from None


def _shape_from(schema: pa.Schema) -> tuple[int, ...] | None:
    meta = schema.metadata or {}
    for key in SHAPE_KEYS:
        if key in meta:
            return tuple(json.loads(meta[key]))
    return None


def _read_x(column: pa.ChunkedArray, shape: tuple[int, ...] | None, path: Path) -> torch.Tensor:
    col = column.combine_chunks()
    n = len(col)
    values = col
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col)
        if col.null_count or (n and pc.min(lengths).as_py() != pc.max(lengths).as_py()):
            raise DataError(
                f"the x rows of {path} are missing or differ in length: give every sample the same number of values"
            )
        values = col.flatten()
    try:
        flat = values.to_numpy(zero_copy_only=False).astype(np.float32)
    except (pa.ArrowException, ValueError, TypeError):
        raise DataError(f"the x column of {path} holds {values.type}, not numbers: store float values") from None
    if shape is None:  # no shape recorded: each row is a vector
        shape = (flat.size // n if n else getattr(col.type, "list_size", 0),)
    if flat.size != n * math.prod(shape):
        raise DataError(f"the x rows of {path} do not match the recorded sample shape {shape}: re-export the file")
    return torch.from_numpy(flat.reshape(n, *shape))


def _int_column(table: pa.Table, name: str, path: Path) -> torch.Tensor | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count or not pa.types.is_integer(col.type):
        raise DataError(f"column '{name}' of {path} must hold integers without gaps, got {col.type}: re-export it")
    return torch.from_numpy(col.to_numpy().astype(np.int64))

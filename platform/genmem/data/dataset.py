"""The in-memory dataset record, its manifest and the content hash that ties them together."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import DataError


@dataclass(frozen=True)
class Manifest:
    """What a dataset holds: row count, per-sample shape, dtype, content hash and provenance.

    ``sha256`` is :func:`content_hash` of the rows, so equal hashes mean equal data whatever
    the sharding. ``extra`` carries source parameters (label names, the manifold's F, ...).
    """

    n: int
    shape: tuple[int, ...]
    dtype: str
    sha256: str
    source: str
    split: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "shape": list(self.shape)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        fields = json.loads(text)
        return cls(**{**fields, "shape": tuple(fields["shape"])})


def content_hash(x: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """sha256 of ``x`` as little-endian float32 C-contiguous bytes, then its labels as int64.

    The shape is hashed too, so (n, 4) and (2n, 2) holding the same numbers differ. The result
    depends only on the values, so it is stable across runs, processes and machines.
    """
    h = hashlib.sha256()
    xs = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
    h.update(json.dumps(list(xs.shape)).encode())
    h.update(xs)
    if labels is not None:
        h.update(b"labels")
        h.update(np.ascontiguousarray(labels.detach().cpu().numpy(), dtype="<i8"))
    return h.hexdigest()


@dataclass
class ArrayDataset:
    """Samples ``x`` (float32, (n, *shape); images (n, C, H, W) in [-1, 1]) with provenance.

    ``index`` holds each row's id in the materialised source, ``labels`` class or region labels,
    ``is_synthetic`` marks generated rows of a real/synthetic mix, and ``meta`` holds any other
    per-row columns (model_id, seed, ...) read from or written to Parquet.

    Usage::

        ds = ArrayDataset.from_tensors(x, labels, source="moons")
        small = ds.take(torch.arange(10))
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor
    manifest: Manifest
    is_synthetic: torch.Tensor | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        x: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | None = None,
        *,
        source: str,
        split: str = "all",
        extra: dict[str, Any] | None = None,
    ) -> ArrayDataset:
        """Wrap freshly made rows (index 0..n-1) and compute their manifest."""
        x = torch.as_tensor(x, dtype=torch.float32)
        labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        manifest = Manifest(len(x), tuple(x.shape[1:]), "float32", content_hash(x, labels), source, split, extra or {})
        return cls(x, labels, torch.arange(len(x)), manifest)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def label_of(self, item: str | int) -> int | None:
        """The label index that ``item`` names (a label name such as ``"3"`` or ``"outer"``, or
        an index) when some row carries it, else None."""
        names = self.manifest.extra.get("label_names")
        k = names.index(item) if isinstance(item, str) and names and item in names else item
        k = int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else None
        return k if self.labels is not None and k is not None and bool((self.labels == k).any()) else None

    def label_choices(self) -> str:
        """The labels present, by name where the data names them (for error messages)."""
        names = self.manifest.extra.get("label_names")
        present = sorted(set(self.labels.tolist())) if self.labels is not None else []
        return ", ".join(names[i] if names else str(i) for i in present)

    def __len__(self) -> int:
        return self.x.shape[0]

    def label_indices(self, items: list[str | int], what: str) -> list[int]:
        """The label indices that ``items`` name, refusing one no row carries (``what``: the
        setting that named them, for the message)."""
        if self.labels is None:
            raise DataError(f"{what} names labels, but the {self.manifest.source} data has none: leave {what} unset")
        out = []
        for item in items:
            if (k := self.label_of(item)) is None:
                raise DataError(f"{what} names {item!r}, which is not a label of the {self.manifest.source} data: choose among "
                                f"{self.label_choices()}")
            out.append(k)
        return sorted(set(out))

    def without_labels(self, labels: list[int]) -> ArrayDataset:
        """The rows whose label is none of ``labels``, in their order."""
        return self.take(torch.nonzero(~torch.isin(self.labels, torch.tensor(labels, dtype=self.labels.dtype))).flatten())

    def take(self, idx: torch.Tensor) -> ArrayDataset:
        """The rows ``idx``, with n and sha256 of the manifest recomputed."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        x = self.x[idx]
        labels = None if self.labels is None else self.labels[idx]
        manifest = dataclasses.replace(self.manifest, n=len(x), sha256=content_hash(x, labels))
        synthetic = None if self.is_synthetic is None else self.is_synthetic[idx]
        meta = {name: col[idx.numpy()] for name, col in self.meta.items()}
        return ArrayDataset(x, labels, self.index[idx], manifest, synthetic, meta)

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row columns besides ``x``, ready for :func:`write_shards`."""
        cols: dict[str, np.ndarray] = {"index": self.index.numpy()}
        if self.labels is not None:
            cols["label"] = self.labels.numpy()
        if self.is_synthetic is not None:
            cols["is_synthetic"] = self.is_synthetic.numpy()
        return {**cols, **self.meta}

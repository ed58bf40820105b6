"""Data named on a command line, from anywhere: a Parquet file or folder, a ``.npy``/``.npz``
array, an image folder, a dataset genmem knows (``digits``, ``mnist``, ...) or a data config
file. What `genmem audit` reads its samples, training set and held-out set from.

Image-shaped sets are checked against each other up front: one shape, and one value range
(``[-1, 1]``, ``[0, 1]`` or ``[0, 255]``), or each rescaled from its own to ``[-1, 1]`` on request.

Usage::

    train = read_input("digits", role="train")
    samples = read_input("exports/samples", role="samples", size=(8, 8))
    sets = align({"samples": samples, "training set": train}, rescale=False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DATA_SOURCES, FILE_SOURCES, DataConfig, read_yaml_mapping, validate
from ..storage import pull
from . import images, user
from .dataset import ArrayDataset
from .errors import DataError, DataNotFoundError
from .materialise import load_dataset

# The value ranges image data comes in; image folders are read into the first.
IMAGE_RANGES = {"[-1, 1]": (-1.0, 1.0), "[0, 1]": (0.0, 1.0), "[0, 255]": (0.0, 255.0)}
KNOWN = tuple(s for s in DATA_SOURCES if s not in FILE_SOURCES or s == "mnist")  # a name alone is enough

Decode = Callable[[Path, Sequence[str], "tuple[int, int] | None"], list]


def read_input(spec: str, *, role: str, size: tuple[int, int] | None = None, mode: images.ImageMode = "auto",
               decode: Decode | None = None) -> ArrayDataset:
    """The dataset ``spec`` names, as the ``role`` it plays (``train``, ``heldout`` or ``samples``).

    A known dataset's name or a data config (YAML with the keys of ``data:``, or a training config
    holding ``data:``) gives its genmem split named by ``role`` (``samples`` and ``train``: the
    training split). ``decode(folder, files, size)`` decodes an image folder's files elsewhere
    (the audit job: on Ray tasks for large folders)."""
    if spec in KNOWN or spec.endswith((".yaml", ".yml")):
        cfg = _data_config(spec)
        train, heldout = load_dataset(cfg)
        return heldout if role == "heldout" else train
    path = pull(spec)
    if not path.exists():
        raise DataNotFoundError(
            f"{spec} does not exist: give the {role} as a Parquet file or folder, a .npy/.npz array, an image folder, "
            f"a data config (.yaml) or one of {', '.join(KNOWN)}"
        )
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return channels_first(user.read_array(path))
        if path.suffix == ".parquet":
            return channels_first(user.read_parquet(path))
        raise DataError(f"{spec} is neither Parquet nor a .npy/.npz array: give the {role} as one of those or as a folder")
    if any(path.glob("*.parquet")):
        return channels_first(user.read_parquet(path))
    files = images.image_files(path)
    decoded = decode(path, files, size) if decode is not None else images.decode_images(path, files, size)
    return images.stack_images(path, files, decoded, mode=mode)


def _data_config(spec: str) -> DataConfig:
    if spec in KNOWN:
        return DataConfig(source=spec)
    tree = read_yaml_mapping(spec, "data config", "configs/digits_flow.yaml", DataError)
    data = tree.get("data")  # a training config holds its data config under data:
    return validate(DataConfig, data if isinstance(data, dict) else tree)


def channels_first(ds: ArrayDataset) -> ArrayDataset:
    """(n, H, W, C) images with C of 1 or 3, as numpy and most exporters write them (EDM's and
    guided-diffusion's sample archives), turned into genmem's (n, C, H, W)."""
    if len(ds.shape) == 3 and ds.shape[2] in (1, 3) and ds.shape[0] not in (1, 3):
        x = ds.x.permute(0, 3, 1, 2).contiguous()
        out = ArrayDataset.from_tensors(x, ds.labels, source=ds.manifest.source, extra=ds.manifest.extra)
        out.meta, out.index = ds.meta, ds.index
        return out
    return ds


def value_range(x: torch.Tensor, what: str) -> str:
    """The image range ``x`` is in (a key of :data:`IMAGE_RANGES`), read from its 0.1% and 99.9%
    quantiles, so that a generator's few overshooting values do not decide it; a bulk outside
    every range widened by half its width is an error."""
    flat = x.flatten()
    values = flat[:: max(1, flat.numel() // 1_000_000)].double().numpy()
    lo, hi = np.quantile(values, [0.001, 0.999])
    name = "[0, 255]" if hi > 1.5 else "[-1, 1]" if lo < -0.25 else "[0, 1]"
    low, high = IMAGE_RANGES[name]
    margin = (high - low) / 2
    if lo < low - margin or hi > high + margin:
        ranges = ", ".join(IMAGE_RANGES)
        raise DataError(f"values of {what} run from {lo:.4g} to {hi:.4g}, outside any image range ({ranges}): scale them to one of these")
    return name


def rescaled(ds: ArrayDataset, name: str) -> ArrayDataset:
    """``ds`` mapped from image range ``name`` to [-1, 1] (row order, index and meta kept)."""
    low, high = IMAGE_RANGES[name]
    if (low, high) == (-1.0, 1.0):
        return ds
    out = ArrayDataset.from_tensors((ds.x - low) * (2.0 / (high - low)) - 1.0, ds.labels, source=ds.manifest.source,
                                    split=ds.manifest.split, extra={**ds.manifest.extra, "rescaled_from": name})
    out.meta, out.index = ds.meta, ds.index
    return out


def align(sets: dict[str, ArrayDataset], *, rescale: bool = False) -> dict[str, ArrayDataset]:
    """Check that the named sets (the first is the one the others are compared with) have one
    per-sample shape and, for images, one value range; with ``rescale`` each image set is first
    mapped from its own range to [-1, 1]. One sentence names any mismatch and its fix."""
    (first, ref), *others = sets.items()
    for name, ds in others:
        if ds.shape != ref.shape:
            fix = ("set image_size (--image-size) to read both at one size, or export them at one size"
                   if len(ref.shape) == 3 else "give data with the same number of values per sample")
            raise DataError(f"per-sample shapes differ ({first} {ref.shape}, {name} {ds.shape}): {fix}")
    if len(ref.shape) != 3:
        return sets
    ranges = {name: value_range(ds.x, f"the {name}") if len(ds) else "[-1, 1]" for name, ds in sets.items()}  # an empty split has none
    if rescale:
        return {name: rescaled(ds, ranges[name]) for name, ds in sets.items()}
    if len(set(ranges.values())) > 1:
        said = ", ".join(f"{name} {r}" for name, r in ranges.items())
        raise DataError(f"value ranges differ ({said}): rescale them to one range, or pass --rescale to map each from its own to [-1, 1]")
    return sets

"""Image folders as datasets: PNG and JPEG files under a folder (nested folders too), read with
Pillow, resized to one size where asked, as (n, C, H, W) float32 in [-1, 1] with each row's file
path (relative to the folder) kept as provenance.

Usage::

    files = image_files("exports/samples")
    ds = read_image_files("exports/samples", files, size=(28, 28), mode="auto")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .dataset import ArrayDataset
from .errors import DataError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ImageMode = Literal["auto", "L", "RGB"]

# Pillow modes read as one grey channel; every other supported mode is read as RGB (alpha dropped).
_GREY = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"}
_COLOUR = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def image_files(folder: str | Path) -> list[str]:
    """The PNG and JPEG files under ``folder`` (any depth, any case of suffix), as paths relative
    to it in sorted order: row k of the dataset is always the same file."""
    root = Path(folder)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder does not exist: {root}: point it at a folder of PNG or JPEG files")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{root} holds no PNG or JPEG files (searched every subfolder): export the images there as .png or .jpg")
    return files


def _decode(path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """One file as an (H, W, C) float32 array in [0, 1] (C = 1 grey, 3 colour) and whether it was colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _GREY:
                if mode.startswith("I"):  # 16- or 32-bit grey: scale by its own bit depth
                    arr = np.asarray(img, dtype=np.float64)
                    peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                    img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
                else:
                    img = img.convert("L")
            elif mode in _COLOUR:
                img = img.convert("RGB")
            else:
                raise DataError(f"{path} has image mode {mode}, which genmem does not read: re-export it as 8-bit grey or RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}): remove the file or export it again") from None
    return (arr[..., None] if arr.ndim == 2 else arr), arr.ndim == 3


def _channels(a: np.ndarray, channels: int) -> np.ndarray:
    if a.shape[2] == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=2)
    return (a * np.array([0.299, 0.587, 0.114], dtype=np.float32)).sum(2, keepdims=True)  # ITU-R 601 luma, as Pillow's "L"


def decode_images(folder: str | Path, files: Sequence[str], size: tuple[int, int] | None) -> list[tuple[np.ndarray, bool]]:
    """``files`` (relative to ``folder``) decoded, each (H, W, C) in [0, 1] with whether it was colour."""
    root = Path(folder)
    return [_decode(root / f, size) for f in files]


def stack_images(folder: str | Path, files: Sequence[str], decoded: Sequence[tuple[np.ndarray, bool]], *,
                 mode: ImageMode = "auto") -> ArrayDataset:
    """Decoded images as one dataset: one size (else an error naming two files that differ and
    the fix), one channel count (``mode``; ``auto``: one grey channel where every image is grey,
    R = G = B included, else RGB), scaled from [0, 1] to [-1, 1]."""
    shapes = {a.shape[:2] for a, _ in decoded}
    if len(shapes) > 1:
        first = decoded[0][0].shape[:2]
        other = next(i for i, (a, _) in enumerate(decoded) if a.shape[:2] != first)
        raise DataError(
            f"images in {folder} differ in size ({files[0]} is {first[0]}x{first[1]}, {files[other]} is "
            f"{decoded[other][0].shape[0]}x{decoded[other][0].shape[1]}): set image_size (--image-size) to resize them to one size"
        )
    channels = 3 if mode == "RGB" or (mode == "auto" and any(c for _, c in decoded)) else 1
    # Contiguous in (n, C, H, W): a transposed view would reach convolutions as channels-last
    # memory, whose kernels round differently (FD moved by 4e-8 relative in a test).
    x = np.ascontiguousarray(np.stack([_channels(a, channels) for a, _ in decoded]).transpose(0, 3, 1, 2))
    if mode == "auto" and channels == 3 and np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 1], x[:, 2]):
        x = x[:, :1]
    ds = ArrayDataset.from_tensors(x * 2.0 - 1.0, source="images", extra={"path": str(folder), "files": len(files)})
    ds.meta["path"] = np.asarray(list(files), dtype=object)
    return ds


def read_image_files(folder: str | Path, files: Sequence[str] | None = None, *, size: tuple[int, int] | None = None,
                     mode: ImageMode = "auto") -> ArrayDataset:
    """An image folder (or ``files`` of it) as one dataset in this process."""
    files = image_files(folder) if files is None else list(files)
    return stack_images(folder, files, decode_images(folder, files, size), mode=mode)

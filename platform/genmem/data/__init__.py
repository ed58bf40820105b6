"""Data: built-in and user sources, Parquet shards with manifests, seeded splits and mixing.

Usage::

    from genmem.data import load_dataset, mix
    train, heldout = load_dataset(cfg.data)
    training_set = mix(train, synthetic, ratio=0.5, seed=cfg.seed)
"""

from .dataset import ArrayDataset, Manifest, content_hash
from .errors import DataError, DataNotFoundError
from .materialise import build_source, dataset_key, load_dataset, load_real
from .shards import read_shards, seal_shards, write_part, write_shards
from .sources import TOYS, toy_regions
from .splits import as_synthetic, concat, mix, select, split, subset, synthetic_count

__all__ = [
    "ArrayDataset",
    "as_synthetic",
    "concat",
    "DataError",
    "DataNotFoundError",
    "Manifest",
    "build_source",
    "content_hash",
    "dataset_key",
    "load_dataset",
    "load_real",
    "mix",
    "read_shards",
    "select",
    "seal_shards",
    "write_part",
    "split",
    "subset",
    "synthetic_count",
    "TOYS",
    "toy_regions",
    "write_shards",
]

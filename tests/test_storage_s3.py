"""Storage on a real S3-compatible server (moto's server mode on 127.0.0.1): writes go through
to the bucket, reads come back from it on a machine whose local mirror is empty, and a train ->
sample -> evaluate round trip runs with ``GENMEM_STORAGE=s3://...``, each command with its own
empty mirror, as on three different nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import torch

from genmem.checkpoint import load_checkpoint, read_meta, save_checkpoint
from genmem.config import DataConfig, ModelConfig, TrainConfig
from genmem.data import load_dataset, read_shards, write_shards
from genmem.errors import DataNotFoundError, StorageError
from genmem.models import build_model
from genmem.storage import MARKER, atomic_write_text, check_storage, join, local_path, pull, storage_root, uri_of


def _bucket(endpoint: str) -> pafs.S3FileSystem:
    """An independent view of the bucket (not genmem's): what another tool would see."""
    return pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="testing", secret_key="testing")


def _objects(endpoint: str, uri: str) -> set[str]:
    path = uri.removeprefix("s3://")
    infos = _bucket(endpoint).get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File}


def _new_node(tmp_path, monkeypatch, name: str) -> None:
    """Another machine: same store, an empty local mirror."""
    monkeypatch.setenv("GENMEM_CACHE", str(tmp_path / name))


def test_mirror_paths_and_uris_round_trip(s3_storage):
    root = storage_root()
    assert root == local_path(s3_storage) and str(root).startswith(os.environ["GENMEM_CACHE"])
    assert uri_of(root / "samples" / "a") == f"{s3_storage}/samples/a"
    assert join(s3_storage, "ray", "run") == f"{s3_storage}/ray/run"  # Path would fold s3:// to s3:/
    assert uri_of("/some/local/path") == "/some/local/path"


def test_shards_go_to_the_bucket_and_come_back_on_another_node(s3_storage, s3_server, tmp_path, monkeypatch):
    x, labels = torch.randn(300, 3), torch.arange(300) % 4
    folder = storage_root() / "samples" / "set-1"
    manifest = write_shards(folder, x, {"label": labels}, source="test", split="samples", rows_per_shard=128)
    uri = uri_of(folder)
    assert uri == f"{s3_storage}/samples/set-1"
    objects = _objects(s3_server, uri)
    assert objects == {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "manifest.json", MARKER}

    _new_node(tmp_path, monkeypatch, "node-b")
    assert not local_path(uri).exists()
    ds = read_shards(uri)
    assert torch.equal(ds.x, x) and torch.equal(ds.labels, labels) and ds.manifest.sha256 == manifest.sha256
    assert local_path(uri).is_dir() and str(local_path(uri)).startswith(str(tmp_path / "node-b"))


def test_a_replaced_folder_or_file_is_fetched_again_and_a_half_written_one_is_not_taken(s3_storage, s3_server, tmp_path, monkeypatch):
    uri = f"{s3_storage}/samples/set-2"
    write_shards(local_path(uri), torch.zeros(10, 2), source="test", split="samples")
    assert read_shards(uri).x.abs().sum() == 0  # node A now holds a mirror copy
    atomic_write_text(local_path(f"{s3_storage}/state.json"), "one")

    _new_node(tmp_path, monkeypatch, "node-b")
    write_shards(local_path(uri), torch.ones(10, 2), source="test", split="samples")  # node B replaces it
    atomic_write_text(local_path(f"{s3_storage}/state.json"), "two")

    _new_node(tmp_path, monkeypatch, "cache")  # back on node A: its copies are stale
    assert read_shards(uri).x.sum() == 20
    assert pull(f"{s3_storage}/state.json").read_text() == "two"

    # A folder of the store whose marker never arrived (its writer died mid-upload) is not there:
    # the reader says so rather than reading half the rows as if complete.
    bucket = _bucket(s3_server)
    part = next(local_path(uri).glob("part-*.parquet")).read_bytes()
    with bucket.open_output_stream(f"{s3_storage.removeprefix('s3://')}/samples/half/part-00000.parquet") as out:
        out.write(part)
    _new_node(tmp_path, monkeypatch, "node-c")
    with pytest.raises(DataNotFoundError, match=r"does not exist: s3://genmem-test/\w+/samples/half"):
        read_shards(f"{s3_storage}/samples/half")
    # The same files uploaded by a user outside the store are plain Parquet, read as they are.
    with bucket.open_output_stream("genmem-test/user-data/part-00000.parquet") as out:
        out.write(part)
    assert len(read_shards("s3://genmem-test/user-data")) == 10


def test_checkpoint_round_trip_through_the_bucket(s3_storage, tmp_path, monkeypatch):
    cfg = TrainConfig(model=ModelConfig(kind="mlp", hidden=16, depth=1))
    model = build_model(cfg.model, (2,))
    uri = f"{s3_storage}/checkpoints/c1"
    save_checkpoint(local_path(uri), model, cfg, shape=(2,), step=3, images_seen=30, data_manifest="abc")
    _new_node(tmp_path, monkeypatch, "node-b")
    assert read_meta(uri)["step"] == 3
    loaded = load_checkpoint(uri, use_ema=False)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)


def test_dataset_materialised_once_and_shared_through_the_bucket(s3_storage, s3_server, tmp_path, monkeypatch):
    cfg = DataConfig(source="moons", n=200)
    train, heldout = load_dataset(cfg)
    datasets = _objects(s3_server, f"{s3_storage}/datasets")
    assert any(name.endswith("train/part-00000.parquet") for name in datasets) and any(name.endswith(MARKER) for name in datasets)
    _new_node(tmp_path, monkeypatch, "node-b")
    again, _ = load_dataset(cfg)
    assert again.manifest.sha256 == train.manifest.sha256 and torch.equal(again.x, train.x)


def test_a_missing_bucket_is_one_sentence(s3_storage):
    with pytest.raises(StorageError, match=r"storage s3://no-such-bucket-x/p cannot be written .*create the bucket"):
        check_storage("s3://no-such-bucket-x/p")
    check_storage(s3_storage)  # the fixture's bucket is writable


@pytest.mark.slow  # three commands attached to the session's cluster
def test_train_sample_evaluate_with_storage_on_s3(s3_storage, s3_server, tmp_path, ray_address):
    """Each command runs with its own empty mirror (as on another node), attached to a running
    cluster whose nodes hold their own credentials: everything one command hands the next goes
    through the bucket."""
    tiny = ["--set", "data.source=moons", "--set", "data.n=400", "--set", "model.hidden=32", "--set", "model.depth=1",
            "--set", "batch_size=50", "--set", "images=500", "--set", "grid_size=16"]

    def genmem(node: str, *argv: str) -> dict:
        env = {**os.environ, "GENMEM_CACHE": str(tmp_path / node), "RAY_ADDRESS": ray_address}
        out = subprocess.run([sys.executable, "-m", "genmem.cli", *argv, "--json"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    trained = genmem("node-a", "train", *tiny)
    assert trained["checkpoint"].startswith(f"{s3_storage}/ray/") and trained["grid"].startswith("s3://")
    assert {"meta.json", "model.safetensors", "samples.png"} <= _objects(s3_server, trained["checkpoint"])
    assert any(name.startswith("datasets/") for name in _objects(s3_server, s3_storage))

    samples_uri = f"{s3_storage}/exports/samples-7"
    sampled = genmem("node-b", "sample", "--checkpoint", trained["checkpoint"], "--n", "64", "--out", samples_uri, "--seed", "7")
    assert sampled["samples"] == samples_uri and MARKER in _objects(s3_server, samples_uri)
    assert not any(".staging" in name for name in _objects(s3_server, f"{s3_storage}/exports"))  # parts cleaned up

    evaluated = genmem("node-c", "evaluate", "--checkpoint", trained["checkpoint"], "--samples", samples_uri)
    assert evaluated["samples"] == samples_uri and 0.0 <= evaluated["memorised_fraction"] <= 1.0
    ds = read_shards(samples_uri)  # and this process, a fourth mirror, reads the same rows
    assert len(ds) == 64 and ds.index.tolist() == list(range(64)) and set(ds.meta["seed"].tolist()) == {7}
    assert set(ds.meta["model_id"]) == {sampled["checkpoint_id"]}


@pytest.mark.slow  # trains twice through Ray Train's local mode
def test_a_local_mode_run_on_s3_resumes_from_its_checkpoint_in_the_bucket_on_another_node(s3_storage, tmp_path, monkeypatch, ray_local):
    """`num_workers: 0` (the trial's own process) keeps its checkpoints in the bucket; the same run
    name with a longer budget, on a machine whose mirror is empty, goes on from the last of them."""
    from mlflow import MlflowClient

    from genmem.runs.training import train_model

    cfg = TrainConfig.model_validate(dict(
        name="s3-local", run_name="s3-local", data=dict(source="moons", n=400), model=dict(hidden=32, depth=1), batch_size=64,
        images=64 * 20, log_every_images=64 * 5, checkpoint_every_images=64 * 10, grid_size=16, scaling=dict(num_workers=0),
    ))
    first = train_model(cfg)
    assert first["checkpoint"].startswith(f"{s3_storage}/ray/s3-local/") and first["images_seen"] == 64 * 20
    assert {"meta.json", "model.safetensors"} <= _objects(os.environ["AWS_ENDPOINT_URL"], first["checkpoint"])

    _new_node(tmp_path, monkeypatch, "node-b")
    longer = train_model(cfg.model_copy(update={"images": 64 * 30}))
    assert longer["images_seen"] == 64 * 30 and longer["mlflow_run_id"] == first["mlflow_run_id"]
    assert longer["checkpoint"] != first["checkpoint"] and longer["checkpoint"].startswith(f"{s3_storage}/ray/s3-local/")
    steps = [m.step for m in MlflowClient().get_metric_history(first["mlflow_run_id"], "train/loss")]
    assert steps == [64 * 5 * k for k in range(1, 7)]  # each once: the second run went on from 20 steps, not from 0

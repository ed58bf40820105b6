"""Training on a real local Ray cluster with Accelerate DDP, MLflow on a real server,
fault tolerance, and the checks that refuse bad requests before any Ray work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
from safetensors.torch import load_file
from mlflow import MlflowClient

from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.distributed.sampling import sample
from genmem.runs.training import train_model
from genmem.data import read_shards
from genmem.errors import ClusterError, StorageError, TrackingError

# Hooks defined here travel to Ray workers by value (the tests folder is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny(**over) -> TrainConfig:
    base = dict(
        name="tiny",
        data=dict(source="moons", n=1000),
        model=dict(hidden=32, depth=1),
        batch_size=64,
        images=64 * 30,
        log_every_images=64 * 5,
        checkpoint_every_images=64 * 10,
        grid_every_images=64 * 15,
        grid_size=32,
        scaling=dict(num_workers=2, max_failures=1),
    )
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return TrainConfig.model_validate(base)


def _runs(uri: str, run_name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("genmem/train")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.ray_run_name = '{run_name}'")


def test_two_workers_train_with_ddp_and_log_to_mlflow(ray_local, tracking, storage):
    cfg = tiny()
    result = train_model(cfg)
    # DDP really on: the replicas' parameters are identical after training (ranks take disjoint
    # slices of the global batch: tests/test_training.py).
    assert result["num_workers"] == 2 and result["param_spread"] == 0.0
    assert result["images_seen"] == 64 * 30 and result["step"] == 30
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt.meta["mlflow_run_id"] == result["mlflow_run_id"]

    client, runs = _runs(tracking, result["run_name"])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.hidden"] == "32" and run.data.params["scaling.num_workers"] == "2"
    # only what applies: an MLP has no U-Net channels, data that is not the manifold no ambient dimension
    assert not {"model.channels", "model.channel_mults", "data.ambient_dim", "scaling.gpus_per_worker"} & set(run.data.params)
    assert run.data.tags["checkpoint_uri"] == result["checkpoint"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [64 * 5 * k for k in range(1, 7)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "images" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images)


def test_one_process_and_two_workers_train_the_same_parameters(ray_local, tracking, storage):
    # training.py's promise: the same global batches and noise whatever the worker count, so DDP
    # over 2 workers (each the mean over its half, gradients averaged) equals one process (Ray
    # Train's local mode, num_workers=0; one worker runs the same function in a worker process)
    # up to float reduction order. Another seed is the scale of a real difference.
    from genmem.data import load_dataset
    from genmem.training import LocalReporter, train_loop

    cfg = {n: tiny(images=64 * 10, checkpoint_every_images=0, grid_every_images=0, scaling={"num_workers": n}) for n in (0, 2)}
    one, two = (load_file(Path(train_model(cfg[n])["checkpoint"]) / "model.safetensors") for n in (0, 2))
    seed1 = cfg[0].model_copy(update={"seed": 1})  # the scale of a real difference: trained in this process
    path = train_loop(seed1, load_dataset(seed1.data)[0], LocalReporter(storage / "seed1", seed1.images, quiet=True)).checkpoint
    other = load_file(Path(path) / "model.safetensors")
    same = max((one[k] - two[k]).abs().max().item() for k in one)
    apart = max((one[k] - other[k]).abs().max().item() for k in one)
    assert same < 1e-4, same
    assert apart > 100 * max(same, 1e-6), (apart, same)


def test_local_mode_keeps_checkpoints_as_ray_train_does_and_resumes_by_name(ray_local, tracking, storage, monkeypatch):
    from genmem.distributed.train import ray_storage, run_checkpoints

    monkeypatch.chdir(storage.parent)
    monkeypatch.setenv("GENMEM_STORAGE", storage.name)  # relative: the worker function sets it to the absolute path
    cfg = tiny(run_name="local-run", scaling={"num_workers": 0, "num_to_keep": 2})  # checkpoints at 10, 20, 30 steps
    first = train_model(cfg)
    kept = run_checkpoints(f"{ray_storage()}/local-run")
    assert len(kept) == 2 and first["checkpoint"] == kept[-1] and first["num_workers"] == 0
    assert kept[-1].startswith(str(storage.absolute()))
    assert load_checkpoint(kept[0]).meta["images_seen"] == 64 * 20 and first["images_seen"] == 64 * 30
    # The worker function set its storage and tracking variables in this process; they were put back.
    assert os.environ["GENMEM_STORAGE"] == storage.name and os.environ["MLFLOW_TRACKING_URI"] == tracking
    # The same name with a longer budget resumes from the last checkpoint, in the same MLflow run.
    longer = train_model(cfg.model_copy(update={"images": 64 * 40}))
    assert longer["images_seen"] == 64 * 40 and longer["mlflow_run_id"] == first["mlflow_run_id"]
    client, runs = _runs(tracking, "local-run")
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [64 * 5 * k for k in range(1, 9)]  # each logged once: the resumed run went on from 30 steps


def test_sampling_tasks_split_the_work_and_keep_per_sample_seeds(toy_checkpoint, ray_local, tracking, storage, tmp_path):
    ckpt = toy_checkpoint  # the session's trained toy model: any checkpoint will do
    a = sample(ckpt, 50, tmp_path / "a", seed=3, tasks=3)
    b = sample(ckpt, 50, tmp_path / "b", seed=3, tasks=1)
    assert a["tasks"] == 3 and b["tasks"] == 1
    da, db = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert len(list((tmp_path / "a").glob("part-*.parquet"))) == 3
    assert da.index.tolist() == list(range(50)) and set(da.meta["seed"].tolist()) == {3}
    assert (da.x - db.x).abs().max() < 1e-5


def test_more_workers_than_the_cluster_can_place_is_refused(ray_local, storage):
    with pytest.raises(ClusterError, match=r"asks for 4 workers of 1 CPU each \(PACK\) but this Ray cluster can place only 2"):
        train_model(tiny(scaling={"num_workers": 4}))


def test_unreachable_tracking_server_fails_before_ray_work(monkeypatch, storage):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        train_model(tiny())
    assert not storage.exists()


def test_unwritable_storage_fails_before_ray_work(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a path below a regular file cannot be created, not even by root
    monkeypatch.setenv("GENMEM_STORAGE", str(blocker / "store"))
    with pytest.raises(StorageError, match=r"storage path .*a-file/store is not writable"):
        train_model(tiny())

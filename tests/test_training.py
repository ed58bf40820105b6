"""The local training loop, checkpoints, and the quality of what it learns on 2-D toys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genmem.checkpoint import CheckpointError, load_checkpoint
from genmem.config import ModelConfig, TrainConfig
from genmem.data import ArrayDataset, load_dataset
from genmem.generative import build_process, derive_seed, generate
from genmem.training import LocalReporter
from genmem.metrics import mmd_rbf
from genmem.models import build_model, count_parameters
from genmem.training import TrainingError, global_positions, train_loop


def _cfg(**over) -> TrainConfig:
    base = dict(
        data=dict(source="moons", n=4000),
        model=dict(kind="mlp", hidden=128, depth=3),
        batch_size=256,
        images=256 * 20,
        ema_halflife_images=20_000,
        log_every_images=10**9,
    )
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return TrainConfig.model_validate(base)


def _train(cfg: TrainConfig, tmp_path, name="run", train=None, resume=None):
    train = train if train is not None else load_dataset(cfg.data)[0]
    return train_loop(cfg, train, LocalReporter(tmp_path / name, cfg.images, quiet=True), resume=resume)


@pytest.mark.slow
@pytest.mark.parametrize("kind, method", [("flow", "heun"), ("diffusion", "sde")])
def test_training_on_a_2d_toy_learns_the_distribution(kind, method, storage, tmp_path):
    # 1,000 steps of a small MLP; the untrained network misses the margin by far (measured: trained
    # MMD -6.6e-4 (flow) and -2.4e-4 (diffusion), unbiased estimates of 0; at 2,000 steps ~1e-3;
    # untrained, initialised with seeds 0-5, 0.033-0.080 (flow) and 0.047-0.125 (diffusion),
    # 0.080 / 0.078 with seed 0).
    cfg = _cfg(process={"kind": kind}, sampler={"method": method, "steps": 64}, images=256 * 1000)
    train, heldout = load_dataset(cfg.data)
    result = _train(cfg, tmp_path, train=train)
    ckpt = load_checkpoint(result.checkpoint)
    process = build_process(cfg.process)
    ref = heldout.x[:1000]
    trained = mmd_rbf(generate(ckpt.model, process, cfg.sampler, (2,), range(1000), seed=1), ref)
    with torch.random.fork_rng():  # a seeded untrained network: with the global RNG its MMD drifted with the tests run before
        torch.manual_seed(0)
        untrained_net = build_model(cfg.model, (2,))
    untrained = mmd_rbf(generate(untrained_net, process, cfg.sampler, (2,), range(1000), seed=1), ref)
    assert trained < 0.005, trained
    assert untrained > 0.03, untrained


def test_same_seed_gives_bitwise_equal_training(storage, tmp_path):
    cfg = _cfg(model={"dropout": 0.1})
    a = load_file(_train(cfg, tmp_path, "a").checkpoint / "model.safetensors")
    b = load_file(_train(cfg, tmp_path, "b").checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(_train(_cfg(seed=1, model={"dropout": 0.1}), tmp_path, "c").checkpoint / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_the_same_run_bit_for_bit(storage, tmp_path):
    full = _cfg(images=256 * 12)
    straight = load_file(_train(full, tmp_path, "straight").checkpoint / "model.safetensors")
    half = _train(_cfg(images=256 * 6), tmp_path, "half")
    ckpt = load_checkpoint(half.checkpoint, use_ema=False, with_optimizer=True)
    resumed = _train(full, tmp_path, "resumed", resume=ckpt)
    assert resumed.step == 12 and resumed.images_seen == 256 * 12
    got = load_file(resumed.checkpoint / "model.safetensors")
    assert all(torch.equal(straight[k], got[k]) for k in straight)


def test_data_order_is_a_seeded_permutation_per_epoch():
    n, batch = 10, 4
    rows = torch.cat([global_positions(n, s, batch, seed=3) for s in range(5)])  # two epochs
    assert sorted(rows[:10].tolist()) == list(range(10))
    assert sorted(rows[10:20].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:20])
    assert torch.equal(rows, torch.cat([global_positions(n, s, batch, seed=3) for s in range(5)]))


def test_checkpoint_round_trip_and_architecture_check(storage, tmp_path):
    cfg = _cfg()
    result = _train(cfg, tmp_path)
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["images_seen"] == result.images_seen == 256 * 20
    assert meta["step"] == 20 and meta["shape"] == [2]
    assert meta["data_manifest"] == load_dataset(cfg.data)[0].manifest.sha256
    assert meta["parameters"] == count_parameters(build_model(cfg.model, (2,)))
    ckpt = load_checkpoint(result.checkpoint, expect=cfg.model)
    x = torch.randn(5, 2)
    t = torch.rand(5)
    ema = load_file(result.checkpoint / "ema.safetensors")
    reference = build_model(cfg.model, (2,))
    reference.load_state_dict(ema)
    torch.testing.assert_close(ckpt.model(x, t), reference(x, t))
    with pytest.raises(CheckpointError, match=r"model.hidden=128 but model.hidden=64 was requested"):
        load_checkpoint(result.checkpoint, expect=ModelConfig(kind="mlp", hidden=64, depth=3))
    # The file itself is checked too: weights of another network are refused in one sentence.
    meta["config"]["model"]["hidden"] = 64
    (result.checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(result.checkpoint)


def test_checkpoint_folder_without_meta_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="has no meta.json"):
        load_checkpoint(tmp_path / "ckpt")


def test_nan_loss_stops_and_names_the_step(storage, tmp_path):
    cfg = _cfg()
    train = load_dataset(cfg.data)[0]
    x = train.x.clone()
    x[7] = float("nan")  # one poisoned row reaches a batch within the first epoch
    poisoned = ArrayDataset(x, train.labels, train.index, train.manifest)
    with pytest.raises(TrainingError, match=r"became nan by step \d+ \(\d+ images seen"):
        _train(cfg, tmp_path, "nan", train=poisoned)
    assert not (tmp_path / "nan" / "checkpoint").exists()


def test_unet_trains_on_digits_and_writes_a_grid(storage, tmp_path):
    cfg = _cfg(data={"source": "digits"}, model={"kind": "unet", "channels": 16}, batch_size=64, images=64 * 4, grid_size=16)
    reporter = LocalReporter(tmp_path / "digits", cfg.images, quiet=True)
    result = train_loop(cfg, load_dataset(cfg.data)[0], reporter)
    assert result.images_seen == 256 and load_checkpoint(result.checkpoint).shape == (1, 8, 8)
    assert reporter.grids and reporter.grids[-1].stat().st_size > 0


def test_ranks_take_disjoint_slices_of_the_same_global_batch():
    from genmem.training import Engine, draw_batch

    class Rank(Engine):
        def __init__(self, rank: int):
            super().__init__("cpu")
            self.rank, self.world_size = rank, 2

    cfg = _cfg(batch_size=8)
    x = torch.arange(40.0).reshape(20, 2)
    whole, r0, r1 = draw_batch(x, cfg, 3, Engine("cpu")), draw_batch(x, cfg, 3, Rank(0)), draw_batch(x, cfg, 3, Rank(1))
    assert torch.equal(torch.cat([r0.rows, r1.rows]), whole.rows) and not set(r0.rows.tolist()) & set(r1.rows.tolist())
    for part in ("x1", "x0", "t"):  # data and noise: each rank its half of the one global draw
        assert torch.equal(torch.cat([getattr(r0, part), getattr(r1, part)]), getattr(whole, part))


class _Recording:
    """An objective that records the rows it was given and can switch its gradient off."""

    def __init__(self, process, scale: float):
        self.process, self.scale, self.rows = process, scale, []

    def to(self, device):
        return self

    def __call__(self, model, batch):
        self.rows.append(batch.rows.clone())
        return self.scale * self.process.loss(model, batch.x0, batch.x1, batch.t)


def test_the_loop_minimises_the_objective_it_is_given(storage, tmp_path):
    cfg = _cfg(images=256 * 5, ema_halflife_images=0, optim={"grad_clip": None})
    train = load_dataset(cfg.data)[0]
    flat = _Recording(build_process(cfg.process), scale=0.0)  # no gradient: Adam moves nothing
    result = train_loop(cfg, train, LocalReporter(tmp_path / "flat", cfg.images, quiet=True), objective=flat)
    torch.manual_seed(derive_seed(cfg.seed, 4))
    init = build_model(cfg.model, (2,)).state_dict()
    got = load_file(result.checkpoint / "model.safetensors")
    assert all(torch.equal(init[k], got[k]) for k in init)
    assert [r.tolist() for r in flat.rows] == [global_positions(len(train), s, 256, cfg.seed).tolist() for s in range(5)]
    plain = load_file(_train(cfg, tmp_path, "plain").checkpoint / "model.safetensors")
    scaled = train_loop(cfg, train, LocalReporter(tmp_path / "one", cfg.images, quiet=True), objective=_Recording(build_process(cfg.process), 1.0))
    one = load_file(scaled.checkpoint / "model.safetensors")
    assert all(torch.equal(plain[k], one[k]) for k in plain)  # the default objective is the process loss


def test_training_leaves_the_callers_global_rng_alone(storage, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _train(_cfg(images=256 * 2, model={"dropout": 0.1}), tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_resuming_a_run_at_its_end_trains_no_further(storage, tmp_path):
    # A sweep trial killed after its last checkpoint resumes here: no step, no NaN-loss error.
    cfg = _cfg(images=256 * 4)
    done = _train(cfg, tmp_path, "done")
    again = _train(cfg, tmp_path, "again", resume=load_checkpoint(done.checkpoint, use_ema=False, with_optimizer=True))
    assert again.step == 4 and again.images_seen == 256 * 4
    a, b = load_file(done.checkpoint / "model.safetensors"), load_file(again.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_spec_is_checked_on_the_driver_and_frozen():
    """What a training worker receives is one typed record: a wrong field fails where the run is
    built, not on a Ray worker."""
    import dataclasses

    from genmem.config import TrainConfig
    from genmem.runs.training import WorkerSpec

    good = dict(config=TrainConfig(), run_id="r", run_dir="/tmp/run")
    spec = WorkerSpec(**good)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.run_id = "other"
    with pytest.raises(TypeError, match="TrainConfig"):
        WorkerSpec(**{**good, "config": TrainConfig().model_dump()})
    with pytest.raises(ValueError, match="run_id"):
        WorkerSpec(**{**good, "run_id": ""})
    with pytest.raises(TypeError, match="callable"):
        WorkerSpec(**good, hooks=("not a function",))


class _Goal:
    """A goal probe that counts its probes and is reached at the ``at``-th (never: None)."""

    def __init__(self, at: int | None):
        self.at, self.calls = at, 0

    def __call__(self, model, device):
        self.calls += 1
        return {"eval/calls": float(self.calls)}

    def reached(self, measured):
        done = self.at is not None and measured["eval/calls"] >= self.at
        return done, f"probe {int(measured['eval/calls'])} of {self.at}"


def test_a_goal_probe_ends_training_at_the_first_probe_that_reaches_it(storage, tmp_path):
    cfg = _cfg(images=256 * 10, eval_every_images=512)
    train = load_dataset(cfg.data)[0]
    reporter = LocalReporter(tmp_path / "goal", cfg.images, quiet=True)
    goal = _Goal(at=3)
    result = train_loop(cfg, train, reporter, probe=goal)
    assert goal.calls == 3 and result.images_seen == 3 * 512 and result.ended_by == "target"
    assert load_checkpoint(result.checkpoint).meta["images_seen"] == 3 * 512  # the model the goal was judged on
    assert reporter.notes == {"ended_by": "target", "ended_by_reason": "reached at 1,536 images seen: probe 3 of 3"}
    never = LocalReporter(tmp_path / "never", cfg.images, quiet=True)
    result = train_loop(cfg, train, never, probe=_Goal(at=None))
    assert result.images_seen == cfg.images and result.ended_by == "max_images"
    assert never.notes["ended_by_reason"] == "not reached in 2,560 images: probe 5 of None"
    plain = train_loop(cfg, train, LocalReporter(tmp_path / "plain", cfg.images, quiet=True), probe=lambda model, device: {})
    assert plain.ended_by is None and plain.images_seen == cfg.images  # a probe without a goal ends nothing

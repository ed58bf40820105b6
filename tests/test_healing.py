"""Self-healing training (memorisation_budget.action: heal), in this process: the policies'
data, a run that crosses its budget and heals, the last heal's limit, a run resumed from its
checkpoint before a heal it did not finish, and bad settings refused before any work."""

from __future__ import annotations

import shutil

import pytest
import torch

from genmem.checkpoint import load_checkpoint
from genmem.config import TrainConfig
from genmem.data import ArrayDataset, load_dataset
from genmem.evaluation import memorisation_probe
from genmem.methods.healing import RETAINED, Healer
from genmem.methods.unlearning import WeightedObjective
from genmem.training import LocalReporter, ProcessObjective, train_loop

# 32 digits, U-Net 16 channels, probes of 64 samples every 3,200 images (as tests/test_evaluate.py):
# measured here, the memorised fraction runs 0, 0, 0.016, 0.047, 0.20 up to 16,000 images, so a
# budget of 0.1 is crossed at the fifth probe. One heal of 3,200 images took the heal's own 256
# samples from 0.176 to 0.008 memorised.
HEAL = {"samples": 256, "images": 3200, "max_heals": 2}


def _cfg(images: int = 32 * 600, **heal) -> TrainConfig:
    return TrainConfig.model_validate(dict(
        name="heal", data=dict(source="digits", train_size=32), model=dict(kind="unet", channels=16), batch_size=32, images=images,
        log_every_images=3200, ema_halflife_images=500, grid_size=16, sampler=dict(method="euler", steps=16), eval_every_images=3200,
        eval_n=64, memorisation_budget={"max_fraction": 0.1, "action": "heal", "heal": {**HEAL, **heal}}))


class _Recorder(LocalReporter):
    """A local reporter that keeps what it logged and tagged, and a copy of every checkpoint
    (``checkpoint-<images seen>``) to resume from."""

    def __init__(self, output, total):
        super().__init__(output, total, quiet=True)
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, step, images_seen, metrics):
        super().log(step, images_seen, metrics)
        self.logged.append((images_seen, dict(metrics)))

    def heals(self) -> list[tuple[int, dict[str, float]]]:
        return [(seen, m) for seen, m in self.logged if "heal/memorised_fraction" in m]

    def checkpoint(self, step, images_seen, metrics, path, final):
        super().checkpoint(step, images_seen, metrics, path, final)
        shutil.copytree(path, self.output / f"checkpoint-{images_seen}", dirs_exist_ok=True)


def _train(cfg, out, reporter=None, resume=None):
    train, heldout = load_dataset(cfg.data)
    reporter = reporter or _Recorder(out, cfg.images)
    healer = Healer(cfg, train, heldout, history=resume.meta.get("heals") if resume is not None else None)
    result = train_loop(cfg, train, reporter, probe=memorisation_probe(cfg, train, heldout), heal=healer, resume=resume)
    return result, reporter


def test_the_policies_shape_what_training_reads_after_a_heal():
    x = torch.arange(10, dtype=torch.float32).view(10, 1).repeat(1, 2)
    data = ArrayDataset.from_tensors(x, source="probe")
    history = [{"at": 100, "targets": [3, 5], "target_weights": [0.1, 0.3], "fraction_before": 0.5, "fraction_after": 0.0,
                "quality_key": "mmd", "quality_before": 0.1, "quality_after": 0.2, "images": 64},
               {"at": 200, "targets": [5, 7], "target_weights": [0.2, 0.4], "fraction_before": 0.5, "fraction_after": 0.0,
                "quality_key": "mmd", "quality_before": 0.1, "quality_after": 0.2, "images": 64}]
    plain = ProcessObjective(None)

    def healer(policy):
        cfg = TrainConfig.model_validate({"eval_every_images": 100, "batch_size": 4, "memorisation_budget": {
            "max_fraction": 0.1, "action": "heal", "heal": {"policy": policy}}})
        return Healer(cfg, data, data.take(torch.arange(0)), history=history)

    same, objective = healer("keep").data(x, plain)
    assert same is x and objective is plain
    dropped, objective = healer("drop").data(x, plain)
    assert dropped[:, 0].tolist() == [0, 1, 2, 4, 6, 8, 9] and objective is plain  # rows 3, 5 and 7 leave the sampler
    kept, objective = healer("downweight").data(x, plain)
    assert kept is x and isinstance(objective, WeightedObjective)
    expected = torch.full((10,), RETAINED, dtype=torch.float64)
    expected[[3, 5, 7]] = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)  # row 5: the lower of its two heals' weights
    assert torch.equal(objective.w, expected)
    assert healer("keep").exhausted  # two heals recorded, two allowed


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """19,200 images: one crossing at 16,000, then one more probe; every checkpoint kept."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("healed")
    return (*_train(_cfg(images=32 * 600), out), out)


@pytest.mark.slow
def test_a_run_over_budget_heals_itself_and_trains_on(healed):
    result, reporter, _ = healed
    heals = reporter.heals()
    assert [seen for seen, _ in heals] == [16_000], reporter.logged  # healed once, at the crossing
    heal = heals[0][1]
    assert heal["heal/memorised_fraction_before"] > 0.1 >= heal["heal/memorised_fraction"]  # over budget, then under it
    assert heal["heal/memorised_fraction"] < 0.25 * heal["heal/memorised_fraction_before"]
    assert heal["heal/images"] == 3200 and heal["heal/targets"] >= 1
    assert reporter.notes["memorisation_budget"] == "healed" and reporter.notes["memorisation_heal_1"].startswith("at 16000 images")
    # trained on to the end: the last probe is the run's own, and the checkpoint records the heal
    probes = [(seen, m["eval/memorised_fraction"]) for seen, m in reporter.logged if "eval/memorised_fraction" in m]
    assert probes[-1][0] == 19_200 and result.images_seen == 19_200 and result.stopped_at is None
    meta = load_checkpoint(result.checkpoint).meta
    assert [h["at"] for h in meta["heals"]] == [16_000] and meta["heals"][0]["targets"]


@pytest.mark.slow
def test_past_its_last_heal_a_run_stops_at_the_last_checkpoint_under_budget(tmp_path, healed):
    """The healed run's checkpoint at 16,000 (written after its heal, under budget) resumed with
    max_heals=1: its one heal is spent, so the next crossing ends the run there."""
    torch.set_num_threads(2)
    cfg = _cfg(images=32 * 900, max_heals=1)
    after_heal = load_checkpoint(healed[2] / "checkpoint-16000", use_ema=False, with_optimizer=True)
    assert len(after_heal.meta["heals"]) == 1
    result, reporter = _train(cfg, tmp_path / "run", resume=after_heal)
    assert reporter.heals() == []
    probes = [(seen, m["eval/memorised_fraction"]) for seen, m in reporter.logged if "eval/memorised_fraction" in m]
    over = [seen for seen, v in probes if v > 0.1]
    assert over and result.stopped_at == over[0] and probes[-1][0] == over[0] < cfg.images  # the next crossing ended it
    assert reporter.notes["memorisation_budget"] == "stopped" and "after 1 heals" in reporter.notes["memorisation_budget_reason"]
    meta = load_checkpoint(result.checkpoint).meta
    assert meta["images_seen"] < over[0] and len(meta["heals"]) == 1  # the result: a checkpoint under budget, after the heal


@pytest.mark.slow
def test_a_run_killed_in_the_middle_of_a_heal_resumes_and_heals_once(tmp_path, healed):
    """Killed during its heal (before the heal's checkpoint), a run resumes from its checkpoint
    before the crossing, heals again from the same state to the same result, and records it once."""
    torch.set_num_threads(2)
    cfg = _cfg(images=32 * 600)
    whole, whole_log, out = healed
    last = load_checkpoint(out / "checkpoint-12800", use_ema=False, with_optimizer=True)  # the last one before the crossing
    assert not last.meta.get("heals")
    resumed, resumed_log = _train(cfg, tmp_path / "resumed", resume=last)
    assert [seen for seen, _ in resumed_log.heals()] == [16_000]
    measured = lambda log: {k: v for k, v in log.heals()[0][1].items() if k != "heal/seconds"}  # noqa: E731
    assert measured(resumed_log) == pytest.approx(measured(whole_log), rel=1e-5, abs=1e-6)
    targets = lambda result: [h["targets"] for h in load_checkpoint(result.checkpoint).meta["heals"]]  # noqa: E731
    assert targets(resumed) == targets(whole)


@pytest.mark.parametrize(("budget", "message"), [
    ({"max_fraction": 0.1, "action": "heal", "heal": {"max_heals": 0}}, r"max_heals"),
    ({"max_fraction": 0.1, "action": "heal", "heal": {"policy": "forget"}}, r"policy"),
    ({"max_fraction": 0.1, "action": "stop", "heal": {}}, r"memorisation_budget.heal is set but memorisation_budget.action is stop"),
])
def test_bad_heal_settings_are_refused_by_the_config(budget, message):
    from genmem.config import validate
    from genmem.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig, {"eval_every_images": 1000, "memorisation_budget": budget})
    with pytest.raises(ConfigError, match="memorisation_budget is checked at the memorisation probe"):
        validate(TrainConfig, {"memorisation_budget": {"max_fraction": 0.1, "action": "heal"}})

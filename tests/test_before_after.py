"""The pieces that unlearn and finetune share, in-process: rewards registered by kind and built
from their own config sections, and the before/after scaffold's rule that a job reports exactly
the names its measure declares."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from pydantic import TypeAdapter

from genmem.config import ScalingConfig, Strict, validate
from genmem.data import ArrayDataset
from genmem.errors import ConfigError
from genmem.methods.finetune import REWARDS, RewardConfig, RewardModule, build_reward, check_reward, register, rewards_of, upper_bound

POINTS = ArrayDataset.from_tensors(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), source="probe")


def bowl(x: torch.Tensor) -> torch.Tensor:
    """A user's reward, imported by name as ``test_before_after:bowl``."""
    return -x.pow(2).sum(1)


SECTIONS = {
    "linear": {"kind": "linear", "a": [1.0, -2.0]},
    "quadratic": {"kind": "quadratic", "A": [[1.0, 0.0], [0.0, 2.0]], "m": [0.5, 0.0]},
    "region": {"kind": "region", "lo": [-1.0, -1.0], "hi": [1.0, 1.0]},
    "function": {"kind": "function", "function": "test_before_after:bowl"},
}


def test_every_reward_kind_has_a_section_here():
    # a new kind must be added to this test (class rewards need labelled images: tests/test_finetune.py)
    assert set(REWARDS) == {*SECTIONS, "class"}


@pytest.mark.parametrize("kind", sorted(SECTIONS))
def test_each_reward_builds_from_its_section_and_keeps_the_contract(kind):
    cfg = TypeAdapter(RewardConfig).validate_python(SECTIONS[kind])
    assert type(cfg) is REWARDS[kind].Config
    reward = build_reward(cfg, POINTS)
    assert isinstance(reward, REWARDS[kind])
    check_reward(reward, POINTS.x)  # (batch,), differentiable, finite gradient
    r = rewards_of(reward, POINTS.x)
    assert r.dtype == torch.float64 and r.shape == (len(POINTS),)
    bound = upper_bound(reward)
    if bound is not None:
        assert r.max().item() <= bound + 1e-6  # the bound the divergences with a pole rely on


def test_closed_forms_of_the_built_rewards():
    x = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    linear = build_reward(TypeAdapter(RewardConfig).validate_python(SECTIONS["linear"]), POINTS)
    assert torch.allclose(linear(x), torch.tensor([-1.0, 0.5]))
    quadratic = build_reward(TypeAdapter(RewardConfig).validate_python(SECTIONS["quadratic"]), POINTS)
    assert torch.allclose(quadratic(x), torch.tensor([-(0.25 + 2.0) / 2, 0.0]))


def test_a_section_names_the_missing_key_as_the_user_writes_it():
    class Job(Strict):
        reward: RewardConfig

    with pytest.raises(ConfigError, match=r"config key 'reward\.a': Field required"):
        validate(Job, {"reward": {"kind": "linear"}})
    with pytest.raises(ConfigError, match=r"reward"):
        validate(Job, {"reward": {"kind": "nope"}})
    with pytest.raises(ConfigError, match=r"reward\.a has 3 entries but the base's samples have 2 dimensions"):
        build_reward(validate(Job, {"reward": {"kind": "linear", "a": [1, 2, 3]}}).reward, POINTS)


def test_a_kind_registers_once_and_under_its_own_name():
    class Twice(RewardModule):
        kind = "linear"

        class Config(Strict):
            kind: Literal["linear"] = "linear"

    with pytest.raises(ValueError, match="already registered"):
        register(Twice)

    class Mismatch(RewardModule):
        kind = "mismatch"

        class Config(Strict):
            kind: Literal["other"] = "other"

    with pytest.raises(ValueError, match="must default to 'mismatch'"):
        register(Mismatch)
    assert "mismatch" not in REWARDS


class _Measure:
    names = ("spread",)
    compared = ("shift", "per_axis/")
    headline = ("spread",)

    def __init__(self, extra: dict[str, float] | None = None):
        self.extra = extra or {}

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        return {"spread": x.std(0).mean().item(), **self.extra}

    def compare(self, before: torch.Tensor, after: torch.Tensor, checkpoint: str) -> dict[str, float]:
        shift = after.mean(0) - before.mean(0)
        return {"shift": shift.norm().item(), **{f"per_axis/{i}": v.item() for i, v in enumerate(shift)}}


def _change(tmp_path):
    from genmem.runs.before_after import BeforeAfter
    from genmem.tracking import Tracker

    return BeforeAfter("probe", "probe-run", tmp_path, Tracker.disabled(), ScalingConfig())


def test_a_job_reports_what_its_measure_declares_and_nothing_else(tmp_path):
    from genmem.runs.before_after import format_table, reported

    before, after = torch.zeros(10, 2), torch.ones(10, 2) * torch.tensor([3.0, 4.0])
    metrics = _change(tmp_path).measure(_Measure(), before, after, "ckpt")
    assert metrics == {"spread_before": 0.0, "spread": 0.0, "shift": 5.0, "per_axis/0": 3.0, "per_axis/1": 4.0}
    assert reported(_Measure, "lam") == ("spread", "spread_before", "shift", "lam")
    table = format_table(metrics, "changed", "footer")
    assert table.splitlines()[1].split() == ["spread", "0", "0"] and "shift" in table and table.endswith("footer")
    with pytest.raises(RuntimeError, match=r"returned \['typo'\], which it does not declare"):
        _change(tmp_path).measure(_Measure({"typo": math.pi}), before, after, "ckpt")



class _Copies:
    """Fixed before and after figures, as an unlearning measure returns them."""

    names = ("memorised_fraction", "fd_pixels")
    compared = ("forget_mass", "forget_mass_before", "shift")
    headline = ("memorised_fraction", "forget_mass")

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        return {"memorised_fraction": x[0, 0].item(), "fd_pixels": x[0, 1].item()}

    def compare(self, before: torch.Tensor, after: torch.Tensor, checkpoint: str) -> dict[str, float]:
        return {"forget_mass_before": 0.4, "forget_mass": 0.02, "shift": 1.5}


def test_a_change_logs_one_key_per_measure_at_step_0_before_and_1_after(tmp_path):
    """MLflow holds ``<kind>/<name>`` at step 0 (the base's samples) and 1 (the changed model's),
    never a name that encodes the phase; the report reads the two points back from the steps."""
    from mlflow import MlflowClient

    from genmem.runs.before_after import BeforeAfter, report_points
    from genmem.tracking import Tracker, finished_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start("probe", "probe-run", uri=uri)
    change = BeforeAfter("probe", "probe-run", tmp_path, tracker, ScalingConfig())
    metrics = change.measure(_Copies(), torch.tensor([[0.3, 2.0]]), torch.tensor([[0.05, 2.5]]), "ckpt")
    assert metrics["memorised_fraction_before"] == pytest.approx(0.3) and metrics["forget_mass"] == 0.02
    tracker.finish()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert set(run.data.metrics) == {"probe/memorised_fraction", "probe/fd_pixels", "probe/forget_mass", "probe/shift"}
    steps = {key: sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(tracker.run_id, key)) for key in run.data.metrics}
    assert steps == {"probe/memorised_fraction": [(0, 0.3), (1, 0.05)], "probe/fd_pixels": [(0, 2.0), (1, 2.5)],
                     "probe/forget_mass": [(0, 0.4), (1, 0.02)], "probe/shift": [(1, 1.5)]}
    assert run.data.tags["mlflow.note.content"] == ("probe: memorised 30.0% → 5.0%, forget_mass 0.4 → 0.02 "
                                                    "(charts: step 0 the base model, step 1 after probe)")
    [view] = finished_runs(run_ids=[tracker.run_id], uri=uri)
    base, changed = report_points(view, "probe", "λ=5")
    assert (base.base, base.memorised_fraction, base.quality) == (True, pytest.approx(0.3), pytest.approx(2.0))
    assert (changed.base, changed.memorised_fraction, changed.quality, changed.setting) == (False, pytest.approx(0.05), pytest.approx(2.5), "λ=5")

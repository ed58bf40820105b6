"""Ray Tune wiring, with no tracking and no job in it: a :class:`~genmem.space.Space` becomes
Tune's param space and scheduler, and :func:`run_tuner` runs (or restores) a Tuner over a trial
function it is given. The sweep job supplies that function and what it records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from genmem.space import Space


def param_space(space: Space) -> dict[str, Any]:
    """Tune's param_space, keyed by the dotted config keys."""
    make = {"grid": tune.grid_search, "choice": tune.choice}
    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return {a.key: make[a.kind](a.values) if a.kind in make else ranges[a.kind](*a.values) for a in space.axes}


def scheduler(space: Space):
    """Tune's ASHA scheduler when the space asks for one (trials stop early on ``metric``)."""
    if space.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", **space.asha)


def trial_id() -> str:
    return tune.get_context().get_trial_id()


def report(metrics: dict[str, float]) -> None:
    tune.report(metrics)


@dataclass
class TrialOutcome:
    path: str
    error: str | None


def run_tuner(
    trial_fn: Callable[..., None],
    space: Space,
    *,
    name: str,
    storage: Path,
    resume: bool,
    concurrency: int,
    driver: dict[str, float],
    **trial_kwargs: Any,
) -> list[TrialOutcome]:
    """Run ``trial_fn(point, **trial_kwargs)`` for every point of ``space``, up to
    ``concurrency`` at a time, each reserving ``driver``; with ``resume`` restore the sweep
    ``name`` from ``storage`` and finish its unfinished and errored trials."""
    trainable = tune.with_resources(tune.with_parameters(trial_fn, **trial_kwargs), driver)
    folder = storage / name
    if resume and tune.Tuner.can_restore(str(folder)):
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=tune.TuneConfig(num_samples=space.num_samples, metric=space.metric, mode=space.mode,
                                        scheduler=scheduler(space), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1),
        )
    return [TrialOutcome(r.path, None if r.error is None else str(r.error)) for r in tuner.fit()]

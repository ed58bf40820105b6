"""Ray Tune wiring, with no tracking and no job in it: a :class:`~genmem.space.Space` becomes
Tune's param space and scheduler, and :func:`run_tuner` runs (or restores) a Tuner over a trial
function it is given. The sweep job supplies that function and what it records."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune

from genmem.distributed.cluster import enter_environment
from genmem.distributed.train import storage_options
from genmem.space import Space

STOP_GRACE_S = 15  # seconds a stopped trial gets before Tune kills it and its Ray Train workers


def param_space(space: Space) -> dict[str, Any]:
    """Tune's param_space, keyed by the dotted config keys."""
    make = {"grid": tune.grid_search, "choice": tune.choice}
    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return {a.key: make[a.kind](a.values) if a.kind in make else ranges[a.kind](*a.values) for a in space.axes}


def scheduler(space: Space, time_attr: str = "training_iteration", budget: int | None = None):
    """Tune's ASHA scheduler when the space asks for one: trials stop early on ``metric``, their
    progress read from report key ``time_attr`` (``max_t`` defaults to the trial's ``budget``)."""
    if space.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    settings = {**({"max_t": budget} if budget else {}), **space.asha}
    # A trial that reaches max_t ends by itself: stopping it there would kill it before it records its result.
    return ASHAScheduler(time_attr=time_attr, stop_last_trials=False, **settings)


def trial_id() -> str:
    return tune.get_context().get_trial_id()


def report(metrics: dict[str, float]) -> None:
    tune.report(metrics)


@dataclass
class TrialOutcome:
    trial_id: str
    path: str
    error: str | None
    metrics: dict[str, Any]  # its last report
    params: dict[str, Any]  # its point of the space


def run_tuner(
    trial_fn: Callable[..., None],
    space: Space,
    *,
    name: str,
    storage: str,
    resume: bool,
    concurrency: int,
    driver: dict[str, float],
    time_attr: str = "training_iteration",
    budget: int | None = None,
    env: Mapping[str, str] | None = None,
    **trial_kwargs: Any,
) -> list[TrialOutcome]:
    """Run ``trial_fn(point, **trial_kwargs)`` for every point of ``space``, up to
    ``concurrency`` at a time, each reserving ``driver``; with ``resume`` restore the sweep
    ``name`` from ``storage`` and finish its unfinished and errored trials. ``env``: the driver's
    storage and tracking variables, set in each trial's process before ``trial_fn``."""
    trainable = tune.with_resources(tune.with_parameters(_in_environment(trial_fn, dict(env or {})), **trial_kwargs), driver)
    # A trial the scheduler stops is blocked in its TorchTrainer.fit(), which Tune's graceful stop
    # does not interrupt: Tune kills it after this grace (default 600 s, holding its workers).
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOP_GRACE_S))
    options = storage_options(storage)
    folder, fs = f"{options['storage_path']}/{name}", options.get("storage_filesystem")
    if resume and tune.Tuner.can_restore(folder, storage_filesystem=fs):
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=tune.TuneConfig(num_samples=space.num_samples, metric=space.metric, mode=space.mode,
                                        scheduler=scheduler(space, time_attr, budget), max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, verbose=1, **options),
        )
    return [TrialOutcome((r.metrics or {}).get("trial_id", ""), r.path, None if r.error is None else str(r.error),
                         dict(r.metrics or {}), dict(r.config or {})) for r in tuner.fit()]


def _in_environment(trial_fn: Callable[..., None], env: dict[str, str]) -> Callable[..., None]:
    """What Tune runs in a trial's process: the driver's ``env``, then the trial (under the
    trial function's own name, which Tune records and a restored sweep finds again)."""

    @functools.wraps(trial_fn)
    def trial(point: dict[str, Any], **kwargs: Any) -> None:
        enter_environment(env)
        trial_fn(point, **kwargs)

    return trial

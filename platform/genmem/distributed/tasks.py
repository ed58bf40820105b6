"""A map over Ray tasks: each call one task with its CPU/GPU share, scheduled on the whole
cluster (also from inside a Tune trial), results in call order, progress shown once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from genmem.errors import GenmemError


def free_task(fn: Callable[..., Any], **resources: Any):
    """``ray.remote(fn)`` with ``resources``, scheduled on the whole cluster. Inside a Tune trial
    Ray would otherwise capture the task into the trial's placement group, which reserves only
    the trial's driver, and the task could never be placed."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(fn).options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None), **resources)


def map_tasks(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    desc: str | None = None,
    total: int | None = None,
    progress: Callable[[Any], int] | None = None,
    unit: str = "task",
) -> list[Any]:
    """``[fn(*args) for args in calls]`` as Ray tasks, with a progress bar named ``desc`` (none
    without it) that counts tasks, or ``total`` units of which a finished task's result is
    ``progress(result)``.

    A task that fails with a genmem error (a bad input it found) raises that error, its one
    sentence intact; any other failure raises Ray's error, which carries the remote traceback."""
    import ray

    remote = free_task(fn, num_cpus=num_cpus, num_gpus=num_gpus)
    refs = [remote.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = refs
    try:
        with tqdm(total=total if progress else len(refs), unit=unit, desc=desc, disable=desc is None) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                value = ray.get(done[0])
                results[index[done[0]]] = value
                bar.update(progress(value) if progress else 1)
    except ray.exceptions.RayTaskError as exc:
        # Only the tasks still pending: cancelling the one that just failed trips a check in
        # Ray 2.60's task manager that aborts the driver (seen once in the posterior job's test).
        for ref in pending:
            ray.cancel(ref)
        if isinstance(exc.cause, GenmemError):
            raise exc.cause from None
        raise
    return results

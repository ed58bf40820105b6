"""Connecting to Ray and checking, before any work starts, that a request can be placed."""

from __future__ import annotations

import math
import os

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster this process runs under (``ray job submit`` sets RAY_ADDRESS),
    else start a local one with an explicit CPU count."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # address="local": a fresh cluster, never one that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def free_task(fn, **resources):
    """``ray.remote(fn)`` with ``resources``, scheduled on the whole cluster. Inside a Tune trial
    Ray would otherwise capture the task into the trial's placement group, which reserves only
    the trial's driver, and the task could never be placed."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(fn).options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None), **resources)


def placeable_bundles(bundle: dict[str, float], strategy: str) -> int:
    """How many copies of ``bundle`` the alive nodes can hold now (at most one per node when
    the strategy is STRICT_SPREAD)."""
    count = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = min((math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0), default=0)
        count += min(fits, 1) if strategy == "STRICT_SPREAD" else fits
    return count


def check_placeable(bundle: dict[str, float], n: int, strategy: str, what: str) -> None:
    """Refuse in one sentence a request the cluster cannot place, instead of waiting forever."""
    can = placeable_bundles(bundle, strategy)
    if can < n:
        need = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
        raise ValueError(
            f"{what} asks for {n} workers of {need} each ({strategy}) but this Ray cluster can place only {can}: "
            "lower scaling.num_workers or the per-worker resources, or add nodes "
            "(on an autoscaling cluster set scaling.check_resources=false)"
        )


def validate_cluster_config(cfg: dict) -> dict:
    """Ray's own offline validation of a cluster-launcher config (its JSON schema: typos, the
    global worker bound), plus the per-type ``min_workers <= max_workers`` that Ray leaves to
    launch time."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    for name, node_type in prepared.get("available_node_types", {}).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if name != prepared.get("head_node_type") and lo > hi:
            raise ValueError(f"node type '{name}' has min_workers {lo} above max_workers {hi}: lower min_workers or raise max_workers")
    return prepared

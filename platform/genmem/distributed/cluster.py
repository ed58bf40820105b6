"""Connecting to Ray and checking, before any work starts, that a request can be placed."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from genmem.distributed.verbosity import verbose
from genmem.errors import ClusterError, ConfigError
from genmem.storage import storage_env


def enter_environment(env: Mapping[str, str]) -> None:
    """The driver's storage and tracking variables, set in a Ray worker or trial process that
    may have inherited others: the one place genmem writes a worker's environment (a Ray Train
    worker, a Tune trial), called first by the functions Ray runs, never in the driver."""
    os.environ.update(env)


def _quiet_ray_logs() -> None:
    """Runs first in every Ray worker process (runtime_env worker_process_setup_hook): Ray Train's
    internal chatter stays out of the job's output."""
    import ray.train.v2._internal.execution.context as train_context

    # "Reporting training result n: TrainingReport(...)", per rank and report (a logger named by file path)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # Ray Train's detached PlacementGroupCleaner polls the State API every second; without a
    # dashboard each poll warns, and its stop can time out into a traceback. It only matters
    # when a controller dies ungracefully.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.CRITICAL)
    logging.getLogger("ray.train.v2._internal.callbacks.placement_group_callback").setLevel(logging.CRITICAL)


def _init_options(attach: bool = False) -> dict:
    """``ray.init`` options. Attached to a running cluster, whose workers do not inherit this
    process's environment, the job's workers get its storage settings (:func:`storage_env`:
    where, which endpoint, region and mirror; never credentials, which stay each node's own), as
    a job submitted with `genmem submit` does: without them a sampling task could not find an
    S3-compatible store's endpoint."""
    env = {k: v for k, v in storage_env().items() if k not in _job_env_vars()} if attach else {}
    if verbose():
        return {"log_to_driver": True, **({"runtime_env": {"env_vars": env}} if env else {})}
    # Train V2 patches print() in workers to log *and* (a Ray worker's sys.stdout is not
    # sys.__stdout__) to print: every progress line would show twice.
    if "RAY_TRAIN_ENABLE_PRINT_PATCH" not in os.environ:
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return {"log_to_driver": True, "logging_level": logging.WARNING,
            "runtime_env": {"env_vars": env, "worker_process_setup_hook": _quiet_ray_logs}}


def _job_env_vars() -> dict[str, str]:
    """The environment variables a submitted job's own runtime env sets (Ray refuses a driver's
    ``ray.init`` runtime env that sets one of them again)."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (config.get("runtime_env") or {}).get("env_vars") or {}


def attached() -> bool:
    """Whether this process is on a Ray cluster already (a Tune trial, a task, a driver that
    called :func:`ensure_ray`) or runs under one (``ray job submit`` sets RAY_ADDRESS). Work that
    fits in this process runs here when it is not, with no cluster to start (5-8 s on 2 cores)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def ensure_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster this process runs under (``ray job submit`` sets RAY_ADDRESS),
    else start a local one with an explicit CPU count. Ray's own log lines stay out unless
    ``--verbose``."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**_init_options(attach=True))
    else:
        # address="local": a fresh cluster, never one that happens to run on this machine. With its
        # dashboard (on 127.0.0.1): Ray Train's PlacementGroupCleaner asks the state API whether a
        # controller died, and without it a stopped sweep trial's workers keep their CPUs forever.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 **_init_options())


def release_ray() -> None:
    """Disconnect from Ray (stopping a local cluster this process started): after this no
    worker's forwarded log line can reach our stdout, so a final ``--json`` line stays last."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def placeable_bundles(bundle: dict[str, float], strategy: str) -> int:
    """How many copies of ``bundle`` the alive nodes can hold now (at most one per node when
    the strategy is STRICT_SPREAD)."""
    import ray

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
        raise ClusterError(
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
            raise ConfigError(f"node type '{name}' has min_workers {lo} above max_workers {hi}: lower min_workers or raise max_workers")
    return prepared


@dataclass(frozen=True)
class Footprint:
    """What one run of a job holds on the cluster: its driver (a Tune trial reserves this) and
    ``workers`` copies of ``worker`` placed by ``strategy``; ``check=False`` on an autoscaling
    cluster, which grows to fit."""

    driver: dict[str, float]
    worker: dict[str, float]
    workers: int
    strategy: str = "PACK"
    check: bool = True

    def total(self) -> dict[str, float]:
        keys = {*self.driver, *self.worker}
        return {k: self.driver.get(k, 0.0) + self.workers * self.worker.get(k, 0.0) for k in keys}


def concurrency(footprints: list[Footprint], what: str) -> int:
    """How many runs of these footprints fit side by side (the smallest over them); refuses in
    one sentence one that the cluster cannot place at all."""
    totals = cluster_resources()
    fits: list[int] = []
    for fp in footprints:
        if not fp.check:
            continue
        check_placeable(fp.worker, fp.workers, fp.strategy, what)
        for k, v in fp.total().items():
            if v > totals.get(k, 0.0) + 1e-9:
                raise ClusterError(
                    f"{what} needs {v:g} {k} (driver + workers) but the cluster has {totals.get(k, 0.0):g}: "
                    "lower the workers or their resources"
                )
            if v > 0:
                fits.append(math.floor(totals.get(k, 0.0) / v + 1e-9))
    return max(1, min(fits, default=1))

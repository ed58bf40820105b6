"""cluster.yaml passes Ray's own launcher validation; broken copies do not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from genmem.distributed.cluster import validate_cluster_config

CLUSTER = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())


def _validate(cfg: dict) -> None:
    validate_cluster_config(cfg)


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    _validate(CLUSTER)
    head = CLUSTER["available_node_types"][CLUSTER["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules no training tasks
    gpu_types = [k for k in CLUSTER["available_node_types"] if k != CLUSTER["head_node_type"]]
    assert gpu_types and all(CLUSTER["available_node_types"][k]["max_workers"] > 0 for k in gpu_types)
    setup = " ".join(CLUSTER["setup_commands"])
    assert "GENMEM_STORAGE=/mnt/shared" in setup and "GENMEM_RAY_STORAGE=/mnt/shared" in setup
    assert "--dashboard-host=127.0.0.1" in " ".join(CLUSTER["head_start_ray_commands"])


def test_the_head_runs_the_tracking_stack_and_no_sqlite_on_shared_storage():
    head = " ".join(CLUSTER["head_setup_commands"])
    command = next(c for c in CLUSTER["head_setup_commands"] if c.startswith("genmem tracking up"))
    assert "sqlite" not in head and "/mnt/shared" not in command.split("--root")[1].split()[0]  # the database on the head's disk
    assert "--artifacts /mnt/shared/mlartifacts" in command and "[tracking]" in " ".join(CLUSTER["setup_commands"])
    from genmem.cli import build_parser

    args = build_parser().parse_args(command.replace("$(hostname -I | cut -d' ' -f1)", "10.0.0.5").split()[1:])
    assert (args.action, args.backend, args.host, args.port) == ("up", "postgres", "10.0.0.5", 5000)


def test_a_typo_fails_validation():
    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["gpu_1x"]["min_workrs"] = 1
    with pytest.raises(Exception, match="min_workrs"):
        _validate(broken)


def test_min_above_max_fails_validation():
    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["gpu_4x"]["min_workers"] = 3  # its max_workers is 2
    with pytest.raises(ValueError, match="'gpu_4x' has min_workers 3 above max_workers 2"):
        _validate(broken)
    broken["available_node_types"]["gpu_4x"]["min_workers"] = 0
    broken["available_node_types"]["gpu_1x"]["min_workers"] = 8
    broken["max_workers"] = 4  # Ray's own check: the global bound below the sum of minimums
    with pytest.raises(ValueError, match="max_workers"):
        _validate(broken)

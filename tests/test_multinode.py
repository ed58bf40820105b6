"""Multi-node training simulated on one machine with ray.cluster_utils.Cluster: a head with no
CPUs for tasks and two 1-CPU worker nodes; STRICT_SPREAD places one worker per node; losing a
node mid-run and adding another, the run finishes from its last checkpoint."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

from genmem.config import TrainConfig
from genmem.distributed.train import ray_storage
from genmem.runs.training import train_model

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # a simulated three-node cluster


class RecordNode:
    """Write each rank's node id at every checkpoint round."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __call__(self, rank: int, images_seen: int, final: bool) -> None:
        Path(self.folder, f"rank{rank}-{images_seen}").write_text(ray.get_runtime_context().get_node_id())


@pytest.fixture
def three_node_cluster():
    if ray.is_initialized():
        ray.shutdown()  # the session's single-node cluster; the next test that needs it restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _cfg(run_name: str, images: int) -> TrainConfig:
    return TrainConfig.model_validate(dict(
        name="spread", run_name=run_name,
        data=dict(source="moons", n=1000), model=dict(hidden=32, depth=1),
        batch_size=64, images=images, log_every_images=640, checkpoint_every_images=640, grid_size=16,
        scaling=dict(num_workers=2, placement_strategy="STRICT_SPREAD", max_failures=3),
    ))


def test_training_spans_nodes_and_survives_losing_one(three_node_cluster, storage, tmp_path):
    cluster, workers = three_node_cluster
    seen = tmp_path / "nodes"
    seen.mkdir()
    run_name = "spread-node-loss"
    cfg = _cfg(run_name, images=64 * 60)
    with ThreadPoolExecutor(1) as pool:
        # Ray's Cluster installs signal handlers, so node changes stay on the main thread.
        future = pool.submit(train_model, cfg, None, hooks=[RecordNode(seen)])
        deadline = time.time() + 240
        # Both ranks' first-round records: each rank writes its own after the round's report, so the
        # checkpoint can be on storage before rank 0's record is (a full run here read only rank 1's).
        while len(list(seen.glob("*-640"))) < 2 or not list((Path(ray_storage()) / run_name).glob("checkpoint_*/meta.json")):
            assert time.time() < deadline and not future.done(), "no checkpoint appeared"
            time.sleep(0.2)
        first_round = {p.name.split("-")[0]: p.read_text() for p in seen.glob("*-640")}
        cluster.remove_node(workers[0], allow_graceful=False)
        replacement = cluster.add_node(num_cpus=1)
        result = future.result(timeout=400)
    # One worker per node: two distinct nodes in the first round.
    assert set(first_round) == {"rank0", "rank1"} and len(set(first_round.values())) == 2
    assert result["images_seen"] == 64 * 60 and result["param_spread"] == 0.0
    # After the loss, the workers ran on the surviving node and the new one.
    final = {p.read_text() for p in seen.glob(f"*-{64 * 60}")}
    assert final == {workers[1].node_id, replacement.node_id}

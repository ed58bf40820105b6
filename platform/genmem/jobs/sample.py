"""`genmem sample`: N samples of a checkpoint split over Ray tasks (a GPU each where present),
each writing one Parquet shard with provenance; sample k depends only on (seed, k)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from genmem.config import Strict
from genmem.distributed.sampling import sample
from genmem.jobs.base import COMMANDS, Context, Job


class SampleConfig(Strict):
    checkpoint: str  # checkpoint folder written by genmem train
    n: int = Field(gt=0)  # number of samples
    out: str  # output folder for the Parquet shards
    seed: int = 0  # sample k depends only on (seed, k)
    tasks: int | None = Field(None, gt=0)  # Ray tasks (default: one per GPU, else per CPU)
    batch_size: int = Field(256, gt=0)


def run(cfg: SampleConfig, ctx: Context) -> dict[str, Any]:
    return sample(cfg.checkpoint, cfg.n, cfg.out, seed=cfg.seed, tasks=cfg.tasks, batch_size=cfg.batch_size)


JOB = Job(
    command=COMMANDS["sample"],
    config=SampleConfig,
    run=run,
)

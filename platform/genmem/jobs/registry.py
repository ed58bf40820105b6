"""The registry: job name -> job module. The `genmem` subcommands, the ``jobs/<name>.py``
entry points for ``ray job submit`` and ``genmem sweep --job <name>`` all come from here.

Adding a job: write ``genmem/jobs/<name>.py`` defining ``JOB = Job(...)``, add its name below,
and add the four-line ``jobs/<name>.py`` entry point (a test checks they match)."""

from __future__ import annotations

import importlib

from genmem.errors import ConfigError
from genmem.jobs.base import Job

NAMES = ("train", "sample", "evaluate", "posterior", "retrain", "unlearn", "finetune", "memorisation", "audit", "quickstart", "sweep", "report")


def get(name: str) -> Job:
    if name not in NAMES:
        raise ConfigError(f"unknown job '{name}': choose one of {', '.join(NAMES)}")
    job = importlib.import_module(f"genmem.jobs.{name}").JOB
    assert job.name == name, f"genmem.jobs.{name} declares job {job.name!r}"
    return job


def all_jobs() -> list[Job]:
    return [get(name) for name in NAMES]

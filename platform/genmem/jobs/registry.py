"""The registry: job name -> job module. The `genmem` subcommands, the ``jobs/<name>.py``
entry points for ``ray job submit`` and ``genmem sweep --job <name>`` all come from here.

Adding a job: its command in ``genmem/jobs/commands.py``, ``genmem/jobs/<name>.py`` defining
``JOB = Job(command=COMMANDS["<name>"], ...)``, and the four-line ``jobs/<name>.py`` entry point
(a test checks they match). A job's module is imported only when it is asked for."""

from __future__ import annotations

import importlib

from typing import TYPE_CHECKING

from genmem.errors import ConfigError
from genmem.jobs.commands import COMMANDS

if TYPE_CHECKING:
    from genmem.jobs.base import Job

NAMES = tuple(COMMANDS)


def get(name: str) -> Job:
    if name not in NAMES:
        raise ConfigError(f"unknown job '{name}': choose one of {', '.join(NAMES)}")
    job = importlib.import_module(f"genmem.jobs.{name}").JOB
    assert job.command is COMMANDS[name], f"genmem.jobs.{name} declares the command of job {job.name!r}"
    return job


def all_jobs() -> list[Job]:
    return [get(name) for name in NAMES]

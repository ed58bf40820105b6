"""What a job is: a typed config, ``run(cfg, ctx) -> result``, and what it declares to the CLI
and to Tune. Every job module defines one :class:`Job` named ``JOB``; the registry lists them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

from pydantic import BaseModel

from genmem.jobs.commands import COMMANDS, Command, Flag
from genmem.runs.context import Context
from genmem.tracking import experiment_url, numeric, run_url

if TYPE_CHECKING:
    from genmem.distributed.cluster import Footprint

__all__ = ["COMMANDS", "Command", "Context", "Flag", "Job", "links", "numeric"]


@dataclass(frozen=True)
class Job:
    """One capability. ``command``: its command-line face (name, help, flags, example, default
    config: :mod:`genmem.jobs.commands`, read without importing the job). ``run(cfg, ctx)``
    returns a JSON-serialisable dict (the job's result record). ``footprint(cfg)``, ``metrics`` and ``final_report(result)`` make the job sweepable:
    what a trial holds, which metric names its Tune reports carry, and its last report;
    ``time_attr`` is the report key that measures a trial's progress (ASHA's time axis, in which
    a space gives ``max_t`` and ``grace_period``) and ``budget(cfg)`` its value at the end;
    ``table(result)`` is what the CLI prints, ``summary(result)`` its JSON (default: the result);
    ``sweep_figure(space, trials)`` draws the sweep parent run's ``sweep_summary`` image from the
    finished trials (``{"params", "reports"}`` each; :func:`genmem.runs.curves.grouped` helps);
    default: the sweep metric against each swept key; ``sweep_metrics(space, trials)``: numbers
    about the whole sweep logged into that run and returned as the sweep's ``summary``;
    ``report_points(run)``: the (memorised fraction, quality) points a finished run of this job
    holds, read from its MLflow record (:class:`genmem.tracking.RunView`) for `genmem report`."""

    command: Command
    config: type[BaseModel]
    run: Callable[[Any, Context], dict[str, Any]]
    footprint: Callable[[Any], Footprint] | None = None
    preflight: Callable[[Any], None] | None = None  # checks a sweep runs once before its trials
    metrics: tuple[str, ...] | re.Pattern = ()  # the metric names its Tune reports carry
    final_report: Callable[[dict[str, Any]], dict[str, float]] | None = None
    time_attr: str = "training_iteration"  # Tune's count of reports, unless the job names better
    budget: Callable[[Any], int] | None = None
    table: Callable[[dict[str, Any]], str] | None = None
    summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    sweep_figure: Callable[[Any, list[dict[str, Any]]], Any] | None = None
    sweep_metrics: Callable[[Any, list[dict[str, Any]]], dict[str, float]] | None = None
    report_points: Callable[[Any], list[Any]] | None = None

    @property
    def sweepable(self) -> bool:
        return self.footprint is not None

    # What the command line knows of the job (genmem.jobs.commands), read through the job too.
    name = property(lambda self: self.command.name)
    help = property(lambda self: self.command.help)
    flags = property(lambda self: self.command.flags)
    file_key = property(lambda self: self.command.file_key)
    default_config = property(lambda self: self.command.default_config)
    example = property(lambda self: self.command.example)


def links(summary: dict[str, Any]) -> dict[str, str]:
    """A link into the MLflow UI's model-training view for each run a job's result names
    (``mlflow_run_id`` -> ``mlflow_url``, ``train_run_id`` -> ``train_url``, ...), and the run
    list of the job's own run's experiment (``experiment_url``)."""
    out = {key.removesuffix("run_id") + "url": run_url(value) for key, value in summary.items()
           if key.endswith("run_id") and isinstance(value, str) and value}
    if isinstance(summary.get("mlflow_run_id"), str):
        out["experiment_url"] = experiment_url(summary["mlflow_run_id"])
    return out

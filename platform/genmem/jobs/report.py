"""`genmem report`: one chart of memorised fraction against quality across every genmem run that
measured both (posterior arms, retraining generations, unlearned and fine-tuned models,
training-set sizes, evaluated checkpoints), with its table, as one MLflow run.

Each job reads its own runs into points through its registry entry (``report_points``); this
job only gathers runs, asks the registry, and writes the chart (``report.png``), the table
(``report.csv``) and a static page holding both (``report.html``) to a run in
``genmem/report``, and prints the table. With size-study runs of two or more sizes among them,
``memorisation_vs_size.png`` (also on the page) draws them against training-set size.

Usage::

    genmem report                                   # every genmem experiment on the tracking server
    genmem report --experiment posterior retrain    # some experiments
    genmem report --sweep SWEEP_RUN_ID              # the trials of one sweep
    genmem report --run RUN_ID [RUN_ID ...]         # given runs
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from genmem.config import Strict, tracked
from genmem.errors import TrackingError
from genmem.jobs import registry
from genmem.jobs.base import COMMANDS, Context, Job
from genmem.report import AXES, Point, chart, format_table, measured, pareto_front, rows, size_chart, to_csv, to_html
from genmem.tracking import finished_runs, job_run, tracking_uri


class ReportConfig(Strict):
    """Which runs to gather: experiments (``genmem/posterior`` or ``posterior``), one sweep (its
    parent run's id), run ids; all genmem experiments when none is named."""

    experiments: list[str] = Field(default_factory=list)
    sweep: str | None = None
    runs: list[str] = Field(default_factory=list)
    name: str = Field("report", pattern=r"^[A-Za-z0-9_.-]+$")
    memorisation: Literal["fraction", "ct", "authenticity"] = "fraction"  # the memorisation axis


def gather(cfg: ReportConfig) -> tuple[list[Point], int]:
    """Every point of the named runs, and how many finished runs were read."""
    runs = finished_runs(experiments=cfg.experiments, sweep=cfg.sweep, run_ids=cfg.runs, exclude=("genmem/report",))
    readers = {job.name: job.report_points for job in registry.all_jobs() if job.report_points is not None}
    points = [p for run in runs if run.kind in readers for p in readers[run.kind](run)]
    return points, len(runs)


def _sources(cfg: ReportConfig) -> str:
    named = ([f"experiments {', '.join(cfg.experiments)}"] if cfg.experiments else []) + (
        [f"sweep {cfg.sweep}"] if cfg.sweep else []) + ([f"runs {', '.join(cfg.runs)}"] if cfg.runs else [])
    return "; ".join(named) or "every genmem experiment"


def run(cfg: ReportConfig, ctx: Context) -> dict[str, Any]:
    points, n_runs = gather(cfg)
    if not points:
        raise TrackingError(f"no finished run among {_sources(cfg)} at {tracking_uri()} measured both memorisation and quality "
                            f"({n_runs} finished runs read): run evaluate, posterior, retrain, unlearn, finetune or memorisation first")
    axis = cfg.memorisation
    points = measured(points, axis)
    if not points:
        raise TrackingError(f"none of the runs among {_sources(cfg)} measured {AXES[axis].label}: runs from before the copy "
                            "tests carry the memorised fraction alone; use --memorisation fraction or evaluate them again")
    picture, sizes = chart(points, axis), size_chart(points, axis)
    front = pareto_front(points, axis)
    with job_run("report", f"{cfg.name}-{_label(cfg)}", params={**tracked(cfg), "sources": _sources(cfg)},
                 tags={"report_runs": ",".join(sorted({p.run_id for p in points}))[:5000], **ctx.tags},
                 parent_run_id=ctx.parent_run_id, columns=("report/points", "report/runs", "report/pareto")) as tracker:
        tracker.image("report", picture)
        if sizes is not None:  # the size study's runs, against training-set size
            tracker.image("memorisation_vs_size", sizes)
        tracker.text(to_csv(points, axis), "report.csv")
        tracker.text(to_html(points, picture, axis=axis, sizes=sizes), "report.html")
        tracker.metrics({"report/points": len(points), "report/runs": len({p.run_id for p in points}), "report/pareto": sum(front)})
        tracker.describe(_headline(points, front, axis))
    return {"mlflow_run_id": tracker.run_id, "sources": _sources(cfg), "runs_read": n_runs, "memorisation": axis,
            "points": rows(points, axis)}


def _label(cfg: ReportConfig) -> str:
    """What the report gathers, for its run name: ``report-posterior+retrain``, ``report-sweep-1a2b3c4d``."""
    if cfg.experiments:
        return "+".join(e.removeprefix("genmem/") for e in cfg.experiments)
    if cfg.sweep:
        return f"sweep-{cfg.sweep[:8]}"
    return f"{len(cfg.runs)}-runs" if cfg.runs else "all"


def _headline(points: list[Point], front: list[bool], axis: str) -> str:
    """``7 points from 1 run; on the Pareto front: posterior θ* θ* (memorised_fraction 0.23, fd_classifier 0.233), ...``."""
    runs = len({p.run_id for p in points})
    best = [p for p, on in zip(points, front) if on]
    shown = ", ".join(f"{p.method if p.setting in p.method else f'{p.method} {p.setting}'} "  # not "posterior θ* θ*"
                      f"({AXES[axis].field} {getattr(p, AXES[axis].field):.3g}, {p.quality_key} {p.quality:.3g})" for p in best[:3])
    return (f"{len(points)} point{'s' * (len(points) != 1)} from {runs} run{'s' * (runs != 1)}; on the Pareto front: {shown}"
            + (f" and {len(best) - 3} more" if len(best) > 3 else ""))


def table(result: dict[str, Any]) -> str:
    points = [Point(**{k: v for k, v in r.items() if k != "pareto"}) for r in result["points"]]
    return f"{format_table(points, result['memorisation'])}\nreport run {result['mlflow_run_id']}: report.png, report.csv, report.html in genmem/report"


JOB = Job(
    command=COMMANDS["report"],
    config=ReportConfig,
    run=run,
    table=table,
    summary=lambda r: {"mlflow_run_id": r["mlflow_run_id"], "runs_read": r["runs_read"], "points": len(r["points"])},
)

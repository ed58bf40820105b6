"""`genmem sweep`: a Ray Tune sweep over any sweepable job, one trial per point of a
tune_spaces/ file.

Each trial is a driver function (the Train V2 pattern) that applies its point to the base config
and calls the job's ``run``, exactly as the CLI does; the job builds and fits its own
``TorchTrainer`` or Ray tasks. Tune reserves only the trial's driver; ``max_concurrent_trials``
comes from the cluster's resources divided by a trial's footprint (declared by the job), so
trials never starve each other's workers.

MLflow: one parent run per sweep, one child run per trial (the job's own run). ``--resume``
restores an interrupted sweep with ``Tuner.restore``; a trial that finished writes
``done/<trial_id>.json`` and is never rerun, and every run is reopened by key, never duplicated.
"""

from __future__ import annotations

import copy
import math
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from genmem.config import Strict, _set_dotted, to_yaml, validate
from genmem.distributed import tune as tuning
from genmem.distributed.cluster import concurrency, ensure_ray
from genmem.distributed.train import ray_storage
from genmem.errors import ConfigError
from genmem.jobs import registry
from genmem.jobs.base import COMMANDS, Context, Job
from genmem.runs import headlines
from genmem.space import Space, SpaceError, check_space, load_space, sweep_name
from genmem.storage import (
    atomic_write_text,
    check_storage,
    ensure_writable,
    join,
    listdir,
    local_path,
    pull,
    storage_env,
    storage_root,
    uri_of,
)
from genmem.tracking import Tracker, check_reachable, find_run, job_run, tracking_uri
from genmem.viz import line_panels


class SweepConfig(Strict):
    space: str  # search space YAML, e.g. tune_spaces/mixing_ratio.yaml
    job: str  # the swept job
    base: dict[str, Any] = Field(default_factory=dict)  # the job's base config (--config and --set address it)
    name: str | None = None  # default: derived from the space, job and base config
    resume: bool = False  # continue an interrupted sweep; finished trials are not rerun


def _trial(point: dict[str, Any], *, job_name: str, base: dict[str, Any], sweep: str, parent_run_id: str, done_dir: str) -> None:
    """One trial: the job's ``run`` on the base config with this trial's point applied (in a
    process that has the sweep driver's storage and tracking: :func:`genmem.distributed.tune.run_tuner`)."""
    job = registry.get(job_name)
    trial_id = tuning.trial_id()
    done = pull(local_path(done_dir) / f"{trial_id}.json")  # done_dir is a URI under a remote store
    if done.is_file():  # finished before an interruption: report what it measured, run nothing
        for metrics in json.loads(done.read_text())["reports"]:
            tuning.report(metrics)
        return
    tree = copy.deepcopy(base)
    for key, value in point.items():
        _set_dotted(tree, key, value)
    reports: list[dict[str, float]] = []

    def report(metrics: dict[str, float]) -> None:
        reports.append(metrics)
        tuning.report(metrics)

    # The key is deterministic: a restored trial resumes its own Ray and MLflow runs.
    ctx = Context(parent_run_id=parent_run_id, tags={"sweep": sweep, "trial_id": trial_id}, key=f"{sweep}-{trial_id}", report=report)
    result = job.run(validate(job.config, tree), ctx)
    if job.final_report is not None:
        report(job.final_report(result))
    atomic_write_text(done, json.dumps({"params": point, "mlflow_run_id": result["mlflow_run_id"], "reports": reports}, default=str))


def _check(cfg: SweepConfig) -> tuple[Job, Space, list[Any]]:
    """The swept job, its space and every candidate config, all checked before Ray starts."""
    job = registry.get(cfg.job)
    if not job.sweepable:
        sweepable = ", ".join(j.name for j in registry.all_jobs() if j.sweepable)
        raise ConfigError(f"job '{cfg.job}' cannot be swept: choose one of {sweepable}")
    space = load_space(cfg.space)
    checked = check_space(space, job, cfg.base)
    validate(job.config, cfg.base)
    return job, space, checked


# Concurrent trials beyond which the embedded sqlite store slows every write (bench/tracking_load.py:
# p99 0.46 s at 8 writers, 2.9 s at 32, nothing lost): the sweep says so once.
SQLITE_WRITERS = 8


def many_writers_note(uri: str, trials: int) -> str | None:
    """One line for a sweep whose ``trials`` at a time would all write one sqlite file."""
    if not uri.startswith("sqlite:") or trials <= SQLITE_WRITERS:
        return None
    return (f"[genmem sweep] {trials} trials at a time will write one sqlite file ({uri}); each write slows as writers "
            "grow: `genmem tracking up` (an MLflow server over PostgreSQL) serves many (README: Tracking for sweeps and clusters)")


def run(cfg: SweepConfig, ctx: Context) -> dict[str, Any]:
    """Run (or with ``resume`` restore) the sweep. Everything checkable is checked before Ray starts."""
    job, space, checked = _check(cfg)
    name = cfg.name or sweep_name(space, job.name, cfg.base)
    root = join(ray_storage(), "sweeps")
    check_storage(root, "GENMEM_RAY_STORAGE")
    exists = name in listdir(root)
    if exists and not cfg.resume:
        raise SpaceError(f"sweep {name} already exists in {root}: pass --resume to continue it, or --name to start a new one")
    if cfg.resume and not exists:
        raise SpaceError(f"there is no sweep {name} in {root} to resume: run it without --resume first")
    check_reachable()
    if job.preflight is not None:
        job.preflight(validate(job.config, cfg.base))  # e.g. data materialised once, here, not by every trial
    done_dir = ensure_writable(storage_root() / "sweeps" / name / "done")
    ensure_ray()
    footprints = [job.footprint(c) for c in checked]
    fits = concurrency(footprints, f"search space {space.path}: a {job.name} trial")  # refuses what cannot be placed
    limit = space.max_concurrent_trials or fits
    note = many_writers_note(tracking_uri(), limit)
    if note:
        print(note, flush=True)
    params = {"space": space.raw["space"], "num_samples": space.num_samples, "job": job.name, "trials": space.trials}
    with job_run(job.name, f"sweep-{name}", params=params, tags={"sweep": name, "space_file": str(space.path), "sweep_dir": join(root, name)},
                 key=f"sweep:{name}") as tracker:
        tracker.text(to_yaml(validate(job.config, cfg.base)), "base_config.yaml")
        tracker.text(Path(space.path).read_text(), "space.yaml")
        print(f"[genmem sweep] {name}: {space.trials} trials of {job.name}, up to {limit} at a time; MLflow parent run {tracker.run_id}", flush=True)
        env = {**storage_env(), "MLFLOW_TRACKING_URI": tracking_uri(), "GENMEM_RAY_STORAGE": ray_storage()}
        outcomes = tuning.run_tuner(_trial, space, name=name, storage=root, resume=cfg.resume, concurrency=limit,
                                    driver=footprints[0].driver, time_attr=job.time_attr,
                                    budget=job.budget(validate(job.config, cfg.base)) if job.budget else None, job_name=job.name, base=cfg.base, env=env, sweep=name,
                                    parent_run_id=tracker.run_id, done_dir=uri_of(done_dir))
        return _summarise(tracker, job, space, name, join(root, name), done_dir, outcomes)


def _mark_stopped(job: Job, sweep: str, outcomes, finished: set[str]) -> list[dict[str, Any]]:
    """Trials the scheduler stopped (no error, no done-file): Tune ends their process, so their
    MLflow run is closed here, KILLED with the reason as the tag ``stopped``."""
    stopped = []
    for o in outcomes:
        if o.error is not None or not o.trial_id or o.trial_id in finished:
            continue
        at = o.metrics.get(job.time_attr)
        stopped.append({"trial_id": o.trial_id, job.time_attr: at, "params": o.params})
        run_id = find_run(job.name, f"{sweep}-{o.trial_id}")
        if run_id is not None:
            trial = Tracker(run_id)
            trial.tags({"stopped": f"stopped early by the ASHA scheduler at {job.time_attr}={at}"})
            trial.finish("KILLED")
    return stopped


def _summarise(tracker: Tracker, job: Job, space: Space, name: str, folder: str, done_dir: Path, outcomes) -> dict[str, Any]:
    errors = [f"{Path(o.path).name}: {o.error}" for o in outcomes if o.error is not None]
    done = [pull(done_dir / f) for f in listdir(done_dir) if f.endswith(".json")]  # trials on any node
    rows = sorted(({"trial_id": p.stem, **json.loads(p.read_text())} for p in done), key=lambda r: r["trial_id"])
    figure = _summary_figure(job, space, rows)
    if figure is not None:
        tracker.image("sweep_summary", figure)
    tracker.text(json.dumps(rows, indent=2, default=str), "trials.json")
    stopped = _mark_stopped(job, name, outcomes, {r["trial_id"] for r in rows})
    tracker.metrics({"sweep/trials_finished": len(rows), "sweep/trials_failed": len(errors), "sweep/trials_stopped": len(stopped)})
    if errors:
        tracker.tags({"error": f"{len(errors)} trial(s) failed: {errors[0]}"[:5000]})
        tracker.outcome = "FAILED"
    out: dict[str, Any] = {"sweep": name, "metric": space.metric, "path": folder, "mlflow_run_id": tracker.run_id, "trials": len(rows),
                           "failed": errors, "stopped": stopped,
                           "results": [{"trial_id": r["trial_id"], "params": r["params"], "final": r["reports"][-1] if r["reports"] else {}}
                                       for r in rows]}
    if job.sweep_metrics is not None and rows:
        out["summary"] = job.sweep_metrics(space, rows)
        tracker.metrics({f"sweep/{k}": v for k, v in out["summary"].items() if math.isfinite(v)})
    scored = [r for r in out["results"] if space.metric and space.metric in r["final"]]
    if space.mode and scored:
        out["best"] = (min if space.mode == "min" else max)(scored, key=lambda r: r["final"][space.metric])
    tracker.describe(headlines.sweep(job.name, [a.key for a in space.axes], len(rows), len(errors), len(stopped), space.metric,
                                     out.get("best")))
    return out


def _summary_figure(job: Job, space: Space, rows: list[dict[str, Any]]) -> np.ndarray | None:
    """The job's own sweep figure where it declares one; otherwise the sweep metric against each
    swept key."""
    if not rows:
        return None
    if job.sweep_figure is not None:
        return job.sweep_figure(space, rows)
    if not space.metric:
        return None
    panels = {}
    for key in (a.key for a in space.axes):
        pts = [(row["params"].get(key), row["reports"][-1][space.metric]) for row in rows
               if row["reports"] and space.metric in row["reports"][-1]]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
            order = list(dict.fromkeys(str(x) for x, _ in pts))  # lists, strings: one position per value
            pts = [(order.index(str(x)), y) for x, y in pts]
        pts.sort(key=lambda p: p[0])
        panels[f"{space.metric} vs {key}"] = {"": ([float(x) for x, _ in pts], [y for _, y in pts])}
    return line_panels(panels, "swept value")


def format_results(result: dict[str, Any]) -> str:
    metric = result.get("metric")
    lines = [f"sweep {result['sweep']}: {result['trials']} trials finished, {len(result['failed'])} failed"]
    for r in result["results"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        shown = {k: v for k, v in r["final"].items() if metric is None or k == metric}
        lines.append(f"  {r['trial_id']}: {params} -> " + ", ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6]))
    return "\n".join(lines)


JOB = Job(
    command=COMMANDS["sweep"],
    config=SweepConfig,
    run=run,
    table=format_results,
)

"""`genmem sweep`: a Ray Tune sweep over a job, one trial per point of a tune_spaces/ file.

Each trial is a driver function (the Train V2 pattern): it applies its point to the base config
and calls the job, which builds and fits its own ``TorchTrainer`` (``TuneReportCallback`` for
``train``; per-generation ``tune.report`` for ``retrain``). Tune reserves only the trial driver;
``max_concurrent_trials`` comes from the cluster's CPUs divided by a trial's footprint (driver +
its Ray Train workers), so trials never starve each other's workers.

MLflow: one parent run per sweep, one child run per trial (the job's own run), and below a
retraining trial its generation runs. ``--resume`` restores an interrupted sweep with
``Tuner.restore``; a trial that finished writes ``done/<trial_id>.json`` and is never rerun, and
every run is reopened by key, never duplicated.
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from genmem.config import PosteriorConfig, RetrainConfig, TrainConfig, _set_dotted, to_yaml, validate
from genmem.distributed.cluster import check_placeable, ensure_ray
from genmem.distributed.train import preflight, ray_storage
from genmem.methods.retraining import CURVES
from genmem.storage import ensure_writable, storage_root
from genmem.sweep import JOBS, Space, SpaceError, check_space, load_space, sweep_name
from genmem.tracking import Tracker, check_reachable, tracking_uri
from genmem.viz import line_panels

# CPU Tune reserves for a trial's driver function. The posterior driver fits the curvature itself.
DRIVER_CPUS = {"train": 0.1, "retrain": 0.1, "posterior": 1.0}


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _trial(config: dict[str, Any], *, job: str, base: dict[str, Any], env: dict[str, str], sweep: str,
           parent_run_id: str, done_dir: str) -> None:
    """One trial: the job on the base config with this trial's point applied."""
    os.environ.update(env)  # the sweep driver's storage and tracking, whatever this worker inherited
    trial_id = tune.get_context().get_trial_id()
    done = Path(done_dir) / f"{trial_id}.json"
    if done.is_file():  # finished before an interruption: report what it measured, run nothing
        for metrics in json.loads(done.read_text())["reports"]:
            tune.report(metrics)
        return
    tree = copy.deepcopy(base)
    for key, value in config.items():
        _set_dotted(tree, key, value)
    tree["run_name"] = f"{sweep}-{trial_id}"  # deterministic: a restored trial resumes its own runs
    tags = {"sweep": sweep, "trial_id": trial_id}
    reports: list[dict[str, float]] = []

    def report(metrics: dict[str, float]) -> None:
        reports.append(metrics)
        tune.report(metrics)

    if job == "train":
        from ray.tune.integration.ray_train import TuneReportCallback

        from genmem.distributed.train import fit

        result = fit(validate(TrainConfig, tree), parent_run_id=parent_run_id, tags=tags, callbacks=[TuneReportCallback()])
        # the workers' reports (through the callback) carry train/loss; so does the last one
        report({"train/loss": result["loss"], **_numeric({k: result[k] for k in ("images_seen", "step", "param_spread")})})
    elif job == "retrain":
        from genmem.methods.retraining import run_retrain

        def on_generation(g: int, record: dict[str, Any]) -> None:
            report({**_numeric(record["metrics"]), "generation": float(g), "real_fraction": record["real_fraction"]})

        result = run_retrain(validate(RetrainConfig, tree), parent_run_id=parent_run_id, on_generation=on_generation, tags=tags)
    else:
        from genmem.distributed.posterior import run_posterior

        tree.pop("run_name")
        result = run_posterior(validate(PosteriorConfig, tree), parent_run_id=parent_run_id, tags=tags, key=f"{sweep}-{trial_id}")
        metrics: dict[str, float] = {}
        for row in result["arms"]:
            arm = row["arm"] if row["arm"] == "theta_star" or len(tree["scales"]) == 1 else f"{row['arm']}_{row['scale']:g}"
            metrics |= {f"{arm}/{k}": v for k, v in _numeric(row).items() if k != "scale"}
        report(metrics)
    tmp = done.with_suffix(f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps({"params": config, "mlflow_run_id": result["mlflow_run_id"], "reports": reports}, default=str))
    os.replace(tmp, done)


def _train_config(job: str, cfg: Any) -> TrainConfig | None:
    """The training config a trial's workers run under (none for the posterior job)."""
    return cfg if job == "train" else cfg.train if job == "retrain" else None


def _footprint(job: str, cfg: Any) -> tuple[dict[str, float], dict[str, float], int, str]:
    """(driver bundle, worker bundle, workers, placement strategy) of one trial."""
    train = _train_config(job, cfg)
    if train is None:
        return {"CPU": DRIVER_CPUS[job]}, {"CPU": 1.0}, 1, "PACK"  # posterior: driver + one weight-sample task at a time
    s = train.scaling
    worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return {"CPU": DRIVER_CPUS[job]}, worker, s.num_workers, s.placement_strategy


def _concurrency(space: Space, job: str, checked: list[Any]) -> int:
    """Refuse a trial the cluster cannot place; else how many trials fit side by side."""
    totals = ray.cluster_resources()
    fits: list[int] = []
    for cfg in checked:
        train = _train_config(job, cfg)
        if train is not None and not train.scaling.check_resources:
            continue  # an autoscaling cluster grows to fit
        driver, worker, n, strategy = _footprint(job, cfg)
        check_placeable(worker, n, strategy, f"search space {space.path}: a {job} trial")
        need = {k: driver.get(k, 0.0) + n * worker.get(k, 0.0) for k in {*driver, *worker}}
        for k, v in need.items():
            if v > totals.get(k, 0.0) + 1e-9:
                raise SpaceError(
                    f"search space {space.path}: a {job} trial needs {v:g} {k} (driver + workers) but the cluster has "
                    f"{totals.get(k, 0.0):g}: lower the workers or their resources"
                )
            if v > 0:
                fits.append(math.floor(totals.get(k, 0.0) / v + 1e-9))
    return max(1, min(fits, default=1))


def _summary_figure(job: str, space: Space, rows: list[dict[str, Any]]) -> np.ndarray | None:
    """Retraining: each metric against generation, one line per swept value (mean over seeds).
    Other jobs: the sweep metric against each swept key."""
    if not rows:
        return None
    keys = [a.key for a in space.axes]
    if job == "retrain":
        label_keys = [k for k in keys if k.split(".")[-1] != "seed"] or keys
        groups: dict[str, list[list[dict[str, float]]]] = {}
        for row in rows:
            label = ", ".join(f"{k.split('.')[-1]}={row['params'].get(k)}" for k in label_keys)
            groups.setdefault(label, []).append(row["reports"])
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for metric in CURVES:
            lines = {}
            for label, runs in groups.items():
                depth = min(len(r) for r in runs)
                if depth and all(metric in r[0] for r in runs):
                    ys = [float(np.mean([r[g][metric] for r in runs])) for g in range(depth)]
                    lines[label] = (list(range(depth)), ys)
            if lines:
                panels[f"{metric} (mean over seeds)"] = lines
        return line_panels(panels, "generation", integer_x=True) if panels else None
    metric = space.metric
    if not metric:
        return None
    panels = {}
    for key in keys:
        pts = [(row["params"].get(key), row["reports"][-1][metric]) for row in rows if row["reports"] and metric in row["reports"][-1]]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts)
        if not numeric:  # lists, strings: one position per distinct value, in order of appearance
            order = list(dict.fromkeys(str(x) for x, _ in pts))
            pts = [(order.index(str(x)), y) for x, y in pts]
        pts.sort(key=lambda p: p[0])
        panels[f"{metric} vs {key}"] = {"": ([float(x) for x, _ in pts], [y for _, y in pts])}
    return line_panels(panels, "swept value")


def run_sweep(space_path: str | Path, job: str, base: dict[str, Any], *, name: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` restore) the sweep of ``job`` over the space file; ``base`` is the
    job's config tree (YAML plus overrides). Everything checkable is checked before Ray starts."""
    space = load_space(space_path)
    checked = check_space(space, job, base)
    base_cfg = validate(JOBS[job], base)
    name = name or sweep_name(space, job, base)
    root = ensure_writable(ray_storage() / "sweeps")
    folder = root / name
    if folder.exists() and not resume:
        raise SpaceError(f"sweep {name} already exists in {root}: pass --resume to continue it, or --name to start a new one")
    if resume and not folder.exists():
        raise SpaceError(f"there is no sweep {name} in {root} to resume: run it without --resume first")
    check_reachable()
    ensure_writable(storage_root())
    if job in ("train", "retrain"):
        preflight(base_cfg if job == "train" else base_cfg.train)  # data materialised once, here
    done_dir = ensure_writable(storage_root() / "sweeps" / name / "done")

    ensure_ray()
    fits = _concurrency(space, job, checked)  # refuses what cannot be placed, before any trial
    concurrency = space.max_concurrent_trials or fits
    tracker = Tracker.start(job, f"sweep-{name}", params={"space": space.raw["space"], "num_samples": space.num_samples,
                                                           "job": job, "trials": space.trials},
                            tags={"sweep": name, "space_file": str(space.path), "sweep_dir": str(folder)}, key=f"sweep:{name}")
    tracker.text(to_yaml(base_cfg), "base_config.yaml")
    tracker.text(Path(space.path).read_text(), "space.yaml")
    env = {"GENMEM_STORAGE": str(storage_root()), "MLFLOW_TRACKING_URI": tracking_uri(), "GENMEM_RAY_STORAGE": str(ray_storage())}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=job, base=base, env=env, sweep=name, parent_run_id=tracker.run_id, done_dir=str(done_dir)),
        {"CPU": DRIVER_CPUS[job]},
    )
    print(f"[genmem sweep] {name}: {space.trials} trials of {job}, up to {concurrency} at a time; "
          f"MLflow parent run {tracker.run_id}", flush=True)
    try:
        if resume and tune.Tuner.can_restore(str(folder)):
            tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(num_samples=space.num_samples, metric=space.metric, mode=space.mode,
                                            scheduler=space.scheduler(), max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=name, storage_path=str(root), verbose=1),
            )
        results = tuner.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise

    errors = [f"{Path(r.path).name}: {r.error}" for r in results if r.error is not None]
    rows = [{"trial_id": path.stem, **json.loads(path.read_text())} for path in done_dir.glob("*.json")]
    rows.sort(key=lambda r: r["trial_id"])
    figure = _summary_figure(job, space, rows)
    if figure is not None:
        tracker.image("sweep_summary", figure)
    tracker.text(json.dumps(rows, indent=2, default=str), "trials.json")
    tracker.metrics({"sweep/trials_finished": len(rows), "sweep/trials_failed": len(errors)})
    tracker.finish("FINISHED" if not errors else "FAILED")
    out: dict[str, Any] = {"sweep": name, "path": str(folder), "mlflow_run_id": tracker.run_id, "trials": len(rows),
                           "failed": errors, "results": [{"trial_id": r["trial_id"], "params": r["params"],
                                                          "final": r["reports"][-1] if r["reports"] else {}} for r in rows]}
    if space.metric and space.mode and rows:
        scored = [r for r in out["results"] if space.metric in r["final"]]
        if scored:
            pick = (min if space.mode == "min" else max)(scored, key=lambda r: r["final"][space.metric])
            out["best"] = pick
    return out


def format_results(result: dict[str, Any], metric: str | None = None) -> str:
    lines = [f"sweep {result['sweep']}: {result['trials']} trials finished, {len(result['failed'])} failed"]
    for r in result["results"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        shown = {k: v for k, v in r["final"].items() if metric is None or k == metric}
        lines.append(f"  {r['trial_id']}: {params} -> " + ", ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6]))
    return "\n".join(lines)

"""`genmem retrain`: the self-consuming loop on Ray (METHODS.md §Iterative retraining). Each
generation is trained by the train job's driver, sampled by Ray tasks and scored against the
*real* data; a parent MLflow run holds a child run per generation.

A loop keeps its state in ``<storage>/retrain/<run_name>/state.json``; the same ``run_name``
(or, in a sweep, the same trial) resumes after the last finished generation and reopens the same
MLflow runs.

Usage::

    genmem retrain --config configs/toy2d_retrain.yaml --set synthetic_ratio=0.5
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from genmem.config import FEATURES, MetricsConfig, Strict, TrainConfig, to_yaml, tracked
from genmem.data import load_real, read_shards, synthetic_count
from genmem.distributed.neighbours import neighbour_search
from genmem.distributed.sampling import sample
from genmem.errors import ConfigError
from genmem.evaluation import evaluate_samples, primary_fd, training_data
from genmem.generative import derive_seed
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.methods.retraining import (
    CURVES,
    collapse_generation,
    curves,
    select_synthetic,
)
from genmem.report import Point, quality_of
from genmem.runs import headlines
from genmem.runs.curves import grouped
from genmem.runs.evaluations import log_evaluation
from genmem.runs.training import footprint, train_model
from genmem.runs.training import preflight as train_preflight
from genmem.seeds import Retrain as Stream
from genmem.storage import (
    atomic_write_text,
    ensure_writable,
    pull,
    storage_root,
    uri_of,
)
from genmem.tracking import RunView, Tracker, job_run
from genmem.viz import line_panels

# Streams of derive_seed(loop seed, stream, generation): independent randomness per purpose.
FULLY_SYNTHETIC = "fully_synthetic"


class RetrainEvalConfig(Strict):
    """How each generation of the self-consuming loop is measured (against the real data)."""

    n: int = Field(1000, gt=20)  # samples evaluated per generation
    features: list[FEATURES] = Field(default_factory=lambda: ["auto"])
    threshold: float = Field(1 / 3, gt=0, lt=1)


class RetrainConfig(Strict):
    """`genmem retrain`: generation 0 on real data, generation g on real + floor(λ n) fresh samples
    of generation g-1 (or on samples alone: synthetic_ratio=fully_synthetic)."""

    name: str = Field("retrain", pattern=r"^[A-Za-z0-9_.-]+$")
    # unset: a fresh loop; a fixed name resumes that loop after its last finished generation
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0  # model randomness (init, noise, sampling, selection); the real data keeps train.data.seed
    train: TrainConfig = Field(default_factory=TrainConfig)
    generations: int = Field(5, gt=0)  # retrained generations after generation 0
    synthetic_ratio: float | Literal["fully_synthetic"] = 0.5  # λ, synthetic rows per real row
    warm_start: bool = True  # fine-tune generation g-1; false trains each generation from scratch
    accumulate: bool = False  # keep every earlier generation's synthetic rows instead of replacing them
    samples: int | None = Field(None, gt=0)  # generated per generation; default max(synthetic rows, eval.n)
    eval: RetrainEvalConfig = Field(default_factory=RetrainEvalConfig)
    # Collapse: FD rose at each of the last collapse_patience generations and exceeds
    # collapse_factor x the FD of generation 0.
    collapse_factor: float = Field(1.5, gt=1)
    collapse_patience: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "RetrainConfig":
        ratio = self.synthetic_ratio
        if ratio != FULLY_SYNTHETIC and ratio < 0:
            raise ValueError(f"synthetic_ratio must be >= 0 (or fully_synthetic), got {ratio}: use 0 for real data only")
        return self

    @property
    def fully_synthetic(self) -> bool:
        return self.synthetic_ratio == FULLY_SYNTHETIC


def generation_config(cfg: RetrainConfig, run_name: str, g: int, history: list[dict[str, Any]]) -> TrainConfig:
    """The training config of generation ``g`` given the records of generations 0..g-1."""
    tree = cfg.train.model_dump(mode="json")
    tree["name"] = f"{cfg.name}-g{g}"
    tree["run_name"] = f"{run_name}-g{g}"  # deterministic: a killed generation resumes its Ray run
    tree["seed"] = derive_seed(cfg.seed, Stream.TRAIN, g)
    tree["init_from"] = history[-1]["checkpoint"] if cfg.warm_start and g > 0 else None
    folders = [h["synthetic"] for h in history if h.get("synthetic")]
    tree["data"]["synthetic"] = [] if g == 0 else (folders if cfg.accumulate else folders[-1:])
    tree["data"]["real"] = g == 0 or not cfg.fully_synthetic
    return TrainConfig.model_validate(tree)


def _load_state(root: Path, cfg: RetrainConfig) -> dict[str, Any]:
    path = pull(root / "state.json")  # under a remote store, the state another node saved
    config = cfg.model_dump(mode="json", exclude={"run_name"})
    if not path.is_file():
        return {"config": config, "mlflow_run_id": None, "generations": []}
    state = json.loads(path.read_text())
    if state["config"] != config:
        raise ConfigError(
            f"retraining loop {root.name} was started with another config: "
            "resume it with the same config, or leave run_name unset to start a new loop"
        )
    return state


def _save_state(root: Path, state: dict[str, Any]) -> None:
    atomic_write_text(root / "state.json", json.dumps(state, indent=2))  # a kill never leaves half a state file


class _Loop:
    """One loop's fixed facts: the real data, λ's row count, where it lives and how it is tracked."""

    def __init__(self, cfg: RetrainConfig, ctx: Context):
        train_preflight(cfg.train)  # tracking, storage and the real data, before any Ray work
        self.cfg, self.ctx = cfg, ctx
        self.n_real = len(load_real(cfg.train.data)[0])
        self.k = self.n_real if cfg.fully_synthetic else synthetic_count(float(cfg.synthetic_ratio), self.n_real)
        self.n_samples = cfg.samples or max(self.k, cfg.eval.n)
        if self.n_samples < max(self.k, cfg.eval.n):
            raise ConfigError(
                f"samples={self.n_samples} per generation cannot supply {self.k} synthetic rows and {cfg.eval.n} evaluated "
                f"samples: raise samples to at least {max(self.k, cfg.eval.n)} or leave it unset"
            )
        self.run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.root = ensure_writable(storage_root() / "retrain" / self.run_name)
        self.state = _load_state(self.root, cfg)
        self.history: list[dict[str, Any]] = self.state["generations"]

    def generation(self, g: int, tracker: Tracker) -> dict[str, Any]:
        """Train, sample and score generation ``g``; select the rows generation g+1 trains on."""
        cfg = self.cfg
        gen_cfg = generation_config(cfg, self.run_name, g, self.history)
        n_syn = 0 if g == 0 else (self.k * (g if cfg.accumulate else 1))
        n_real = self.n_real if gen_cfg.data.real else 0
        print(f"[genmem retrain] generation {g}/{cfg.generations}: {n_real} real + {n_syn} synthetic rows", flush=True)
        trained = train_model(gen_cfg, Context(parent_run_id=tracker.run_id, tags={"generation": str(g), "loop": self.run_name}),
                                        kind="retrain")
        checkpoint, gen_dir = trained["checkpoint"], self.root / f"g{g}"
        s = cfg.train.scaling
        samples = sample(checkpoint, self.n_samples, gen_dir / "samples", seed=derive_seed(cfg.seed, Stream.SAMPLE, g), tasks=s.num_workers,
                         cpus_per_task=s.cpus_per_worker, gpus_per_task=s.gpus_per_worker if s.use_gpu else 0.0)["samples"]
        metrics, fd_key = self._score(checkpoint, samples, trained["mlflow_run_id"])
        synthetic = None
        if g < cfg.generations and self.k > 0:
            synthetic = uri_of(select_synthetic(samples, self.k, derive_seed(cfg.seed, Stream.SELECT, g), gen_dir / "synthetic",
                                                generation=g, checkpoint=checkpoint))
        metrics["collapsed"] = float(_collapse(cfg, [h["metrics"] for h in self.history] + [metrics]) is not None)
        return {"generation": g, "checkpoint": checkpoint, "samples": samples, "synthetic": synthetic,
                "mlflow_run_id": trained["mlflow_run_id"], "fd_key": fd_key, "n_real": n_real, "n_synthetic": n_syn,
                "memorisation_budget": trained["memorisation_budget"],  # a generation over its budget: flagged or stopped early
                "real_fraction": (n_real / (n_real + n_syn)) if n_real else 0.0, "metrics": metrics}

    def _score(self, checkpoint: str, samples: str, run_id: str) -> tuple[dict[str, float], str]:
        """The generation's first eval.n samples against the real rows, logged into its own run."""
        cfg = self.cfg
        meta, train_ref, heldout_ref = training_data(checkpoint)  # the real rows, hash-checked
        metrics_cfg = MetricsConfig(seed=cfg.seed, features=cfg.eval.features, threshold=cfg.eval.threshold)
        result = evaluate_samples(read_shards(samples).take(torch.arange(cfg.eval.n)), train_ref, heldout_ref, metrics_cfg,
                                  cache_dir=storage_root() / "features", search=neighbour_search(metrics_cfg, len(train_ref)))
        log_evaluation(Tracker(run_id), result, metrics_cfg, step=meta["images_seen"])
        fd_key = primary_fd(result.metrics)
        metrics = {name.removeprefix("eval/"): v for name, v in result.metrics.items()}
        metrics["fd"] = result.metrics[fd_key]
        if f"{fd_key}_lo" in result.metrics:
            metrics["fd_lo"], metrics["fd_hi"] = result.metrics[f"{fd_key}_lo"], result.metrics[f"{fd_key}_hi"]
        return metrics, fd_key.removeprefix("eval/")


def _collapse(cfg: RetrainConfig, generations: list[dict[str, float]]) -> int | None:
    """The collapse generation from each generation's FD and, where every one has it, its interval."""
    spans = [(m["fd_lo"], m["fd_hi"]) for m in generations if "fd_lo" in m]
    return collapse_generation([m["fd"] for m in generations], cfg.collapse_factor, cfg.collapse_patience,
                               intervals=spans if len(spans) == len(generations) else None)


def _generation_report(record: dict[str, Any]) -> dict[str, float]:
    return {**numeric(record["metrics"]), "generation": float(record["generation"]), "real_fraction": record["real_fraction"]}


COLUMNS = ("params.synthetic_ratio", "retrain/memorised_fraction", "retrain/fd", "retrain/precision", "retrain/recall", "tags.collapsed")


def run(cfg: RetrainConfig, ctx: Context) -> dict[str, Any]:
    """Run (or resume) the loop; each finished generation is reported to Tune (in a sweep).
    Returns the per-generation records and the collapse verdict."""
    loop = _Loop(cfg, ctx)
    params = {**tracked(cfg), "n_real": loop.n_real, "n_synthetic": loop.k}
    with job_run("retrain", loop.run_name, params=params, tags={"loop_dir": str(loop.root), **ctx.tags},
                 parent_run_id=ctx.parent_run_id, columns=COLUMNS, key=f"loop:{loop.run_name}") as tracker:
        if loop.state["mlflow_run_id"] is None:
            tracker.text(to_yaml(cfg), "retrain.yaml")
            loop.state["mlflow_run_id"] = tracker.run_id
            _save_state(loop.root, loop.state)
        for record in loop.history:  # a resumed loop reports its finished generations again (Tune restarts trials)
            ctx.emit(_generation_report(record))
        for g in range(len(loop.history), cfg.generations + 1):
            record = loop.generation(g, tracker)
            loop.history.append(record)
            _save_state(loop.root, loop.state)
            m = record["metrics"]
            tracker.metrics({f"retrain/{k}": v for k, v in m.items() if isinstance(v, float)} | {"retrain/real_fraction": record["real_fraction"]}, step=g)
            tracker.image("metrics_by_generation", curves(loop.history))
            print(f"[genmem retrain] generation {g}: {record['fd_key']} {m['fd']:.4g}, memorised {m.get('memorised_fraction', float('nan')):.3f}, "
                  f"sample variance {m['sample_variance']:.4g}", flush=True)
            ctx.emit(_generation_report(record))
        fds = [h["metrics"]["fd"] for h in loop.history]
        collapsed_at = _collapse(cfg, [h["metrics"] for h in loop.history])
        tracker.tags({"collapsed": str(collapsed_at is not None), "collapse_generation": str(collapsed_at)})
        tracker.describe(headlines.generations(loop.history, cfg.synthetic_ratio, collapsed_at))
        tracker.text(json.dumps(loop.history, indent=2), "generations.json")
    return {"run_name": loop.run_name, "mlflow_run_id": tracker.run_id, "synthetic_ratio": cfg.synthetic_ratio,
            "fd_key": loop.history[0]["fd_key"], "fd": fds, "collapsed": collapsed_at is not None,
            "collapse_generation": collapsed_at, "generations": loop.history}


def format_table(result: dict[str, Any]) -> str:
    """Generation by generation, as `genmem retrain` prints it."""
    fd = result["fd_key"]
    head = f"{'gen':>4}{'real':>7}{'synth':>7}{fd:>15}{'precision':>11}{'recall':>8}{'memorised':>11}{'variance':>10}"
    lines = [head, "-" * len(head)]
    for r in result["generations"]:
        m = r["metrics"]
        lines.append(f"{r['generation']:>4}{r['n_real']:>7}{r['n_synthetic']:>7}{m['fd']:>15.4g}{m.get('precision', float('nan')):>11.3f}"
                     f"{m.get('recall', float('nan')):>8.3f}{m.get('memorised_fraction', float('nan')):>11.3f}{m['sample_variance']:>10.4g}")
    verdict = f"collapsed at generation {result['collapse_generation']}" if result["collapsed"] else "no collapse"
    return "\n".join(lines + [f"synthetic_ratio={result['synthetic_ratio']}: {verdict}"])


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "generations"} | {
        "checkpoints": [g["checkpoint"] for g in result["generations"]],
        "metrics": [g["metrics"] for g in result["generations"]],
    }


def sweep_figure(space, rows: list[dict[str, Any]]):
    """Each curve against generation, one line per swept value (mean over seeds)."""
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for metric in CURVES:
        lines = {}
        for label, group in grouped(space, rows).items():
            runs = [[rep for rep in r["reports"] if "generation" in rep] for r in group]
            depth = min(len(r) for r in runs)
            if depth and all(metric in r[0] for r in runs):
                lines[label] = (list(range(depth)), [sum(r[g][metric] for r in runs) / len(runs) for g in range(depth)])
        if lines:
            panels[f"{metric} (mean over seeds)"] = lines
    return line_panels(panels, "generation", integer_x=True) if panels else None


# What every report of a retraining trial carries (Tune refuses a result without the sweep metric).
REPORTS = ("fd", "fd_pixels", "fd_classifier", "fid", "precision", "recall", "density", "coverage", "memorised_fraction",
           "sample_variance", "mmd", "sliced_wasserstein", "lid_mle", "collapsed", "real_fraction", "generation")

def report_points(run: RunView) -> list[Point]:
    """A loop's generation 0 (trained on real data alone: its θ*) and its last generation."""
    found = quality_of(run.metrics, "retrain/")
    if "retrain/memorised_fraction" not in run.metrics or found is None:
        return []  # a generation's own training run, or a loop that measured no memorisation
    memorised, quality = run.history("retrain/memorised_fraction"), run.history(f"retrain/{found[0]}")
    copying = {k: run.history(f"retrain/{k}") for k in ("ct", "authpct") if f"retrain/{k}" in run.metrics}
    steps = sorted(set(memorised) & set(quality))
    ratio = run.params.get("synthetic_ratio", "?")
    out = []
    for g in dict.fromkeys([steps[0], steps[-1]]):
        fields = (dict(method="retrain θ*", setting="generation 0", base=True) if g == 0
                  else dict(method="retrain", setting=f"synthetic_ratio={ratio} (gen {g})"))
        measures = {"memorised_fraction": memorised[g], found[0]: quality[g], **{k: h[g] for k, h in copying.items() if g in h}}
        p = run.point(measures, model=run.run_name, **fields)
        if p:
            out.append(p)
    return out


JOB = Job(
    command=COMMANDS["retrain"],
    config=RetrainConfig,
    run=run,
    footprint=lambda cfg: footprint(cfg.train),
    preflight=lambda cfg: train_preflight(cfg.train),
    metrics=REPORTS,
    time_attr="generation",
    budget=lambda cfg: cfg.generations,
    table=format_table,
    summary=summary,
    sweep_figure=sweep_figure,
    report_points=report_points,
)

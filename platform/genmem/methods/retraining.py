"""The self-consuming loop (METHODS.md §Iterative retraining).

Generation 0 trains on the real data. Generation g trains on the real rows plus floor(λ n) rows
chosen (seeded) from fresh samples of generation g-1, or on those samples alone ("fully
synthetic"); warm-started from g-1 or from scratch, with the same images-seen budget. Every step
reuses a job: training is ``fit`` (Ray Train), sampling is the Ray sampling tasks, scoring is the
evaluate job's ``training_data`` + ``evaluate_samples`` against the *real* data. Synthetic rows
live in Parquet shards with provenance (generation, parent checkpoint, seed, index).

A loop keeps its state in ``<storage>/retrain/<run_name>/state.json``; the same ``run_name``
resumes after the last finished generation and reopens the same MLflow runs.

Usage::

    from genmem.config import load_config, RetrainConfig
    result = run_retrain(load_config("configs/toy2d_retrain.yaml", cls=RetrainConfig))
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genmem.config import EvaluateConfig, RetrainConfig, TrainConfig, to_yaml
from genmem.data import load_real, read_shards, select, synthetic_count, write_shards
from genmem.evaluation import evaluate_samples, primary_fd
from genmem.generative import derive_seed
from genmem.storage import ensure_writable, storage_root
from genmem.tracking import Tracker
from genmem.viz import line_panels

# Streams of derive_seed(loop seed, stream, generation): independent randomness per purpose.
_TRAIN, _SAMPLE, _SELECT = 1, 2, 3
# Per-generation metrics shown against generation (those present: MMD only on 2-D data).
CURVES = ("fd", "precision", "recall", "memorised_fraction", "sample_variance", "mmd")

OnGeneration = Callable[[int, dict[str, Any]], None]


class RetrainError(ValueError):
    """A retraining loop that cannot start or resume; one sentence naming the fix."""


def collapse_generation(fd: list[float], factor: float, patience: int = 2) -> int | None:
    """The first generation g whose FD rose at each of the last ``patience`` generations and
    exceeds ``factor`` x the FD of generation 0; None when the loop has not collapsed."""
    for g in range(patience, len(fd)):
        rising = all(fd[i] > fd[i - 1] for i in range(g - patience + 1, g + 1))
        if rising and fd[g] > factor * fd[0]:
            return g
    return None


def generation_config(cfg: RetrainConfig, run_name: str, g: int, history: list[dict[str, Any]]) -> TrainConfig:
    """The training config of generation ``g`` given the records of generations 0..g-1."""
    tree = cfg.train.model_dump(mode="json")
    tree["name"] = f"{cfg.name}-g{g}"
    tree["run_name"] = f"{run_name}-g{g}"  # deterministic: a killed generation resumes its Ray run
    tree["seed"] = derive_seed(cfg.seed, _TRAIN, g)
    tree["init_from"] = history[-1]["checkpoint"] if cfg.warm_start and g > 0 else None
    folders = [h["synthetic"] for h in history if h.get("synthetic")]
    tree["data"]["synthetic"] = [] if g == 0 else (folders if cfg.accumulate else folders[-1:])
    tree["data"]["real"] = g == 0 or not cfg.fully_synthetic
    return TrainConfig.model_validate(tree)


def _load_state(root: Path, cfg: RetrainConfig) -> dict[str, Any]:
    path = root / "state.json"
    config = cfg.model_dump(mode="json", exclude={"run_name"})
    if not path.is_file():
        return {"config": config, "mlflow_run_id": None, "generations": []}
    state = json.loads(path.read_text())
    if state["config"] != config:
        raise RetrainError(
            f"retraining loop {root.name} was started with another config: "
            "resume it with the same config, or leave run_name unset to start a new loop"
        )
    return state


def _save_state(root: Path, state: dict[str, Any]) -> None:
    tmp = root / f".state-{uuid.uuid4().hex[:8]}.json"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, root / "state.json")  # a kill never leaves half a state file


def _select_synthetic(cfg: RetrainConfig, g: int, samples: str, checkpoint: str, k: int, out: Path) -> str:
    """The floor(λ n) generated rows of generation g that generation g+1 trains on, with provenance."""
    chosen = select(read_shards(samples), k, derive_seed(cfg.seed, _SELECT, g))
    columns = {**chosen.columns(), "generation": np.full(k, g, dtype=np.int64), "parent_checkpoint": np.full(k, checkpoint, dtype=object)}
    columns.pop("is_synthetic", None)
    write_shards(out, chosen.x, columns, source=f"generation:{g}", split="synthetic",
                 extra={"generation": g, "parent_checkpoint": checkpoint, "samples": samples, "selection_seed": derive_seed(cfg.seed, _SELECT, g)})
    return str(out)


def _curves(history: list[dict[str, Any]]) -> np.ndarray:
    panels = {}
    for name in CURVES:
        if all(name in h["metrics"] for h in history):
            panels[name] = {"": ([h["generation"] for h in history], [h["metrics"][name] for h in history])}
    return line_panels(panels, "generation", integer_x=True)


def run_retrain(
    cfg: RetrainConfig,
    *,
    parent_run_id: str | None = None,
    on_generation: OnGeneration | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the loop; ``on_generation(g, record)`` after each generation (a Tune trial
    reports there). Returns the per-generation records and the collapse verdict."""
    from genmem.distributed.evaluate import log_evaluation, training_data
    from genmem.distributed.sampling import sample
    from genmem.distributed.train import fit, preflight

    preflight(cfg.train)  # tracking, storage and the real data, before any Ray work
    real, _ = load_real(cfg.train.data)
    k = len(real) if cfg.fully_synthetic else synthetic_count(float(cfg.synthetic_ratio), len(real))
    n_samples = cfg.samples or max(k, cfg.eval.n)
    if n_samples < max(k, cfg.eval.n):
        raise RetrainError(
            f"samples={n_samples} per generation cannot supply {k} synthetic rows and {cfg.eval.n} evaluated samples: "
            f"raise samples to at least {max(k, cfg.eval.n)} or leave it unset"
        )
    run_name = cfg.run_name or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    root = ensure_writable(storage_root() / "retrain" / run_name)
    state = _load_state(root, cfg)
    history: list[dict[str, Any]] = state["generations"]

    tracker = Tracker.start("retrain", run_name, params={**cfg.model_dump(mode="json"), "n_real": len(real), "n_synthetic": k},
                            tags={"loop_dir": str(root), **(tags or {})}, parent_run_id=parent_run_id, key=f"loop:{run_name}")
    if state["mlflow_run_id"] is None:
        tracker.text(to_yaml(cfg), "retrain.yaml")
        state["mlflow_run_id"] = tracker.run_id
        _save_state(root, state)
    for record in history:  # a resumed loop reports its finished generations again (Tune restarts trials)
        if on_generation:
            on_generation(record["generation"], record)

    try:
        for g in range(len(history), cfg.generations + 1):
            gen_cfg = generation_config(cfg, run_name, g, history)
            n_syn = 0 if g == 0 else (k * (g if cfg.accumulate else 1))
            print(f"[genmem retrain] generation {g}/{cfg.generations}: {len(real) if gen_cfg.data.real else 0} real + "
                  f"{n_syn} synthetic rows", flush=True)
            trained = fit(gen_cfg, kind="retrain", parent_run_id=tracker.run_id, tags={"generation": str(g), "loop": run_name})
            checkpoint = trained["checkpoint"]
            gen_dir = root / f"g{g}"
            samples = sample(checkpoint, n_samples, gen_dir / "samples", seed=derive_seed(cfg.seed, _SAMPLE, g),
                             tasks=cfg.train.scaling.num_workers, cpus_per_task=cfg.train.scaling.cpus_per_worker,
                             gpus_per_task=cfg.train.scaling.gpus_per_worker if cfg.train.scaling.use_gpu else 0.0)["samples"]
            meta, train_ref, heldout_ref = training_data(checkpoint)  # the real rows, hash-checked
            eval_cfg = EvaluateConfig(checkpoint=checkpoint, samples=samples, n=cfg.eval.n, seed=cfg.seed,
                                      features=cfg.eval.features, threshold=cfg.eval.threshold)
            generated = read_shards(samples)
            result = evaluate_samples(generated.take(torch.arange(cfg.eval.n)), train_ref, heldout_ref, eval_cfg,
                                      cache_dir=storage_root() / "features")
            log_evaluation(Tracker(trained["mlflow_run_id"]), result, eval_cfg, step=meta["images_seen"])
            synthetic = None
            if g < cfg.generations and k > 0:
                synthetic = _select_synthetic(cfg, g, samples, checkpoint, k, gen_dir / "synthetic")

            fd_key = primary_fd(result.metrics)
            metrics = {name.removeprefix("eval/"): v for name, v in result.metrics.items()}
            metrics["fd"] = result.metrics[fd_key]
            fds = [h["metrics"]["fd"] for h in history] + [metrics["fd"]]
            collapsed_at = collapse_generation(fds, cfg.collapse_factor, cfg.collapse_patience)
            metrics["collapsed"] = float(collapsed_at is not None)
            record = {
                "generation": g, "checkpoint": checkpoint, "samples": samples, "synthetic": synthetic,
                "mlflow_run_id": trained["mlflow_run_id"], "fd_key": fd_key.removeprefix("eval/"),
                "n_real": len(real) if gen_cfg.data.real else 0, "n_synthetic": n_syn,
                "real_fraction": (len(real) / (len(real) + n_syn)) if gen_cfg.data.real else 0.0,
                "metrics": metrics,
            }
            history.append(record)
            _save_state(root, state)
            tracker.metrics({f"retrain/{name}": v for name, v in metrics.items() if isinstance(v, float)}
                            | {"retrain/real_fraction": record["real_fraction"]}, step=g)
            tracker.image("metrics_by_generation", _curves(history))
            print(f"[genmem retrain] generation {g}: {fd_key.removeprefix('eval/')} {metrics['fd']:.4g}, "
                  f"memorised {metrics.get('memorised_fraction', float('nan')):.3f}, "
                  f"sample variance {metrics['sample_variance']:.4g}", flush=True)
            if on_generation:
                on_generation(g, record)
    except BaseException:
        tracker.finish("FAILED")
        raise

    fds = [h["metrics"]["fd"] for h in history]
    collapsed_at = collapse_generation(fds, cfg.collapse_factor, cfg.collapse_patience)
    tracker.tags({"collapsed": str(collapsed_at is not None), "collapse_generation": str(collapsed_at)})
    tracker.text(json.dumps(history, indent=2), "generations.json")
    tracker.finish()
    return {
        "run_name": run_name,
        "mlflow_run_id": tracker.run_id,
        "synthetic_ratio": cfg.synthetic_ratio,
        "fd_key": history[0]["fd_key"],
        "fd": fds,
        "collapsed": collapsed_at is not None,
        "collapse_generation": collapsed_at,
        "generations": history,
    }


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

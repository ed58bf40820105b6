"""The posterior job: a Laplace posterior fitted once on the driver, its S weight samples per
(method, scale) solved as independent Ray tasks, each generating its share of images; every arm
(θ*, Euclidean, Riemannian at each scale) pooled and evaluated like any model."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import numpy as np
import ray
import torch

from genmem.checkpoint import load_checkpoint
from genmem.config import EvaluateConfig, PosteriorConfig, to_yaml
from genmem.data import read_shards, seal_shards, write_part
from genmem.distributed.cluster import ensure_ray, free_task
from genmem.distributed.evaluate import training_data
from genmem.distributed.sampling import sample, split_ranges
from genmem.evaluation import evaluate_samples, primary_fd
from genmem.generative import build_process, derive_seed, generate
from genmem.posterior import LaplacePosterior
from genmem.storage import ensure_writable, storage_root
from genmem.tracking import Tracker, check_reachable
from genmem.viz import figure_to_array


def _posterior(cfg: PosteriorConfig, ckpt, train_x: torch.Tensor) -> LaplacePosterior:
    process = build_process(ckpt.config.process)
    return LaplacePosterior(ckpt.model, process, train_x, subset=cfg.subset, prior_precision=cfg.prior_precision,
                            curvature=cfg.curvature, draws=cfg.draws, seed=cfg.seed)


def _weight_sample_task(cfg_json: dict, state: dict, train_x: torch.Tensor, method: str, scale: float, seed: int,
                        start: int, stop: int, staging: str, part: int) -> dict[str, Any]:
    """One weight sample (one geodesic solve for Riemannian) and its share of images."""
    cfg = PosteriorConfig.model_validate(cfg_json)
    ckpt = load_checkpoint(cfg.checkpoint)
    la = _posterior(cfg, ckpt, train_x)
    la.load_state_dict(state)
    ws = la.sample_one(seed, method=method, scale=scale, solver=cfg.solver, steps=cfg.steps,
                       rtol=cfg.rtol, atol=cfg.atol, max_evals=cfg.max_evals)
    net = la.apply(ws).float()
    x = generate(net, build_process(ckpt.config.process), ckpt.config.sampler, ckpt.shape, range(start, stop), cfg.seed)
    n = stop - start
    model_id = f"{ckpt.id}/{method}/{scale:g}/{seed}"
    write_part(staging, part, x, {"model_id": np.full(n, model_id), "seed": np.full(n, cfg.seed, dtype=np.int64),
                                  "weight_seed": np.full(n, seed, dtype=np.int64), "index": np.arange(start, stop)})
    return {"seed": seed, "n_grad": ws.n_grad, "n_hvp": ws.n_hvp, "loss_increase": ws.loss_increase, "seconds": ws.seconds}


def _scale_figure(rows: list[dict[str, Any]], fd_key: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for method, colour in (("euclidean", "#1f77b4"), ("riemannian", "#d62728")):
        pts = sorted((r["scale"], r[fd_key], r["memorised_fraction"]) for r in rows if r["arm"] == method)
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", c=colour, label=method)
            for s, x, y in pts:
                ax.annotate(f"τ={s:g}", (x, y), fontsize=6)
    star = [r for r in rows if r["arm"] == "theta_star"][0]
    ax.scatter([star[fd_key]], [star["memorised_fraction"]], marker="*", s=120, c="k", label="θ*", zorder=3)
    ax.set_xlabel(fd_key)
    ax.set_ylabel("memorised fraction")
    ax.legend(fontsize=7)
    return figure_to_array(fig)


def run_posterior(cfg: PosteriorConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  key: str | None = None) -> dict[str, Any]:
    check_reachable()
    meta, train, heldout = training_data(cfg.checkpoint)  # refuses a checkpoint without manifest
    ckpt = load_checkpoint(cfg.checkpoint)
    la = _posterior(cfg, ckpt, train.x)  # refuses an unknown subset pattern, naming what exists
    la.fit()
    if cfg.optimize_prior:
        la.optimize_prior_precision()
    state = la.state_dict()
    ensure_ray()
    root = ensure_writable(storage_root() / "posterior" / f"{meta['checkpoint_id']}-{uuid.uuid4().hex[:6]}")
    eval_cfg = EvaluateConfig(checkpoint=cfg.checkpoint, n=cfg.n, seed=cfg.seed, features=cfg.features)

    rows: list[dict[str, Any]] = []
    star = sample(cfg.checkpoint, cfg.n, root / "theta_star", seed=cfg.seed)
    star_eval = evaluate_samples(read_shards(star["samples"]), train, heldout, eval_cfg, cache_dir=storage_root() / "features")
    rows.append({"arm": "theta_star", "scale": 0.0, **_arm_metrics(star_eval.metrics), "loss_increase": 0.0,
                 "grad_evals": 0.0, "seconds_per_sample": 0.0})

    task = free_task(_weight_sample_task, num_cpus=1)
    state_ref, train_ref = ray.put(state), ray.put(train.x)
    ranges = split_ranges(cfg.n, cfg.samples)
    for method in cfg.methods:
        for scale in cfg.scales:
            staging = root / f".{method}-{scale:g}.staging"
            seeds = [derive_seed(cfg.seed, 17, k) for k in range(len(ranges))]
            refs = [task.remote(cfg.model_dump(mode="json"), state_ref, train_ref, method, scale, s, a, b, str(staging), i)
                    for i, (s, (a, b)) in enumerate(zip(seeds, ranges))]
            try:
                stats = ray.get(refs)
            except ray.exceptions.RayTaskError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise RuntimeError(f"posterior {method} sample at scale {scale:g} failed: {exc.cause}") from None
            folder = root / f"{method}-{scale:g}"
            seal_shards(staging, folder, source=f"posterior:{meta['checkpoint_id']}", split="samples",
                        extra={"method": method, "scale": scale, "weight_samples": stats})
            ev = evaluate_samples(read_shards(folder), train, heldout, eval_cfg, cache_dir=storage_root() / "features")
            rows.append({
                "arm": method, "scale": scale, **_arm_metrics(ev.metrics),
                "loss_increase": float(np.mean([s["loss_increase"] for s in stats])),
                "grad_evals": float(np.mean([s["n_grad"] + s["n_hvp"] for s in stats])),
                "seconds_per_sample": float(np.mean([s["seconds"] for s in stats])),
            })

    fd_key = primary_fd(star_eval.metrics).removeprefix("eval/")
    tracker = Tracker.start("posterior", f"posterior-{meta['checkpoint_id']}", params=cfg.model_dump(mode="json"),
                            tags={"checkpoint_id": meta["checkpoint_id"], "samples_root": str(root),
                                  **({"train_run_id": meta["mlflow_run_id"]} if meta.get("mlflow_run_id") else {}), **(tags or {})},
                            parent_run_id=parent_run_id, key=key)
    for row in rows:
        prefix = row["arm"] if row["arm"] == "theta_star" else f"{row['arm']}_{row['scale']:g}"
        tracker.metrics({f"posterior/{prefix}/{k}": v for k, v in row.items() if isinstance(v, float) and k != "scale"})
    tracker.metrics({"posterior/prior_precision": la.prior_precision})
    tracker.image("memorised_vs_fd", _scale_figure(rows, fd_key))
    tracker.text(to_yaml(cfg), "posterior.yaml")
    tracker.finish()
    return {"mlflow_run_id": tracker.run_id, "prior_precision": la.prior_precision, "fd_key": fd_key, "arms": rows}


_KEYS = ("memorised_fraction", "heldout_memorised_fraction", "fd_pixels", "fd_classifier", "fid", "precision", "recall", "density", "coverage")


def _arm_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[f"eval/{k}"]) for k in _KEYS if f"eval/{k}" in metrics}


def format_table(result: dict[str, Any]) -> str:
    """The arms side by side, as the quickstart prints them."""
    fd = result["fd_key"]
    head = f"{'arm':<12}{'scale':>8}{'memorised':>11}{fd:>15}{'precision':>11}{'recall':>8}{'loss +':>10}{'grad+HVP':>10}{'s/sample':>10}"
    lines = [head, "-" * len(head)]
    for r in result["arms"]:
        lines.append(f"{r['arm']:<12}{r['scale']:>8g}{r['memorised_fraction']:>11.3f}{r.get(fd, float('nan')):>15.2f}"
                     f"{r.get('precision', float('nan')):>11.3f}{r.get('recall', float('nan')):>8.3f}"
                     f"{r['loss_increase']:>10.1f}{r['grad_evals']:>10.0f}{r['seconds_per_sample']:>10.1f}")
    return "\n".join(lines)

"""`genmem posterior`: a Laplace posterior over a checkpoint's weights, S weight samples per
(method, scale), each generating its share of images; every arm (θ*, Euclidean, Riemannian at
each scale) pooled and evaluated like any model.

With ``scaling.num_workers`` = 1 (or 0) the driver fits the posterior and each weight sample is its own
Ray task over the whole training set. With N > 1 a Ray Train worker group of N fits it and solves
every weight sample in turn, each rank holding a shard of the training set (all sums
all-reduced, so every rank takes the same solver steps); Ray tasks then generate each sample's
images from its weights."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from pydantic import Field, model_validator

from genmem.checkpoint import Checkpoint, load_checkpoint
from genmem.config import FEATURES, MetricsConfig, ScalingConfig, Strict, to_yaml, tracked
from genmem.data import ArrayDataset, read_shards, seal_shards, write_part
from genmem.distributed.cluster import Footprint, ensure_ray
from genmem.distributed.neighbours import neighbour_search
from genmem.distributed.sampling import sample, split_ranges
from genmem.distributed.tasks import map_tasks
from genmem.distributed.train import worker_bundle
from genmem.errors import ConfigError
from genmem.evaluation import evaluate_samples, primary_fd, training_data
from genmem.generative import build_process, derive_seed, generate
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.posterior import (
    LaplacePosterior,
    default_subset,
    select_parameters,
    with_weights,
)
from genmem.report import Point
from genmem.runs import headlines
from genmem.runs.evaluations import log_evaluation
from genmem.seeds import Posterior as Stream
from genmem.storage import ensure_writable, remove, storage_root, uri_of
from genmem.tracking import RunView, Tracker, check_reachable, job_run
from genmem.viz import figure_to_array, log_where_decades


class PosteriorConfig(Strict):
    """`genmem posterior`: Laplace weight samples of a checkpoint, evaluated arm by arm."""

    checkpoint: str
    # riemannian: geodesics of the loss; linearised: of its Gauss–Newton model (no data pass per step)
    methods: list[Literal["euclidean", "riemannian", "linearised"]] = Field(default_factory=lambda: ["euclidean", "riemannian"])
    scales: list[float] = Field(default_factory=lambda: [1e-2], min_length=1)  # temperatures tau of the covariance
    samples: int = Field(4, gt=0)  # weight samples S per (method, scale); each a Ray task
    n: int = Field(1000, gt=0)  # images per arm, split evenly over its weight samples
    seed: int = 0
    subset: list[str] | None = None  # fnmatch patterns over parameter names; default: the last blocks
    prior_precision: float = Field(1.0, gt=0)
    optimize_prior: bool = False  # choose alpha by the Laplace marginal likelihood instead
    curvature: Literal["ef", "ggn", "ggn_mc"] = "ef"
    draws: int = Field(8, gt=0)  # fixed (x0, t) draws per training point (common random numbers)
    solver: Literal["dopri5", "bosh3", "rk4"] = "dopri5"
    steps: int = Field(20, gt=0)  # rk4
    rtol: float = Field(1e-4, gt=0)
    atol: float = Field(1e-6, gt=0)
    max_evals: int = Field(5000, gt=0)
    # θ'ᵀ∇²L θ' per right-hand side: a Hessian-vector product, or a forward difference of two gradients
    second_derivative: Literal["hvp", "fd"] = "hvp"
    trunk_cache: bool = True  # run the subset's loss through the network's head on a cached trunk state
    # Workers per weight sample: 1 solves each sample as a Ray task over the whole training set;
    # N > 1 runs the fit and every solve on a Ray Train group of N, one training shard per rank.
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    features: list[FEATURES] = Field(default_factory=lambda: ["auto"])

    @model_validator(mode="after")
    def _check(self) -> "PosteriorConfig":
        bad = [s for s in self.scales if not s > 0]
        if bad:
            raise ValueError(f"posterior scales must be positive, got {bad[0]}: pass scales such as 0.01")
        if self.n < self.samples:
            raise ValueError(f"n={self.n} images cannot be split over {self.samples} weight samples: raise n or lower samples")
        if self.n < 21:  # the evaluation's k-NN metrics use up to 20 neighbours
            raise ValueError(f"n={self.n} images per arm are too few to evaluate: use n of at least 21")
        return self


def _laplace_options(cfg: PosteriorConfig) -> dict[str, Any]:
    return {"subset": cfg.subset, "prior_precision": cfg.prior_precision, "curvature": cfg.curvature, "draws": cfg.draws,
            "seed": cfg.seed, "trunk_cache": cfg.trunk_cache}


def _solver_options(cfg: PosteriorConfig) -> dict[str, Any]:
    return {"solver": cfg.solver, "steps": cfg.steps, "rtol": cfg.rtol, "atol": cfg.atol, "max_evals": cfg.max_evals,
            "second_derivative": cfg.second_derivative}


def _posterior(cfg: PosteriorConfig, ckpt: Checkpoint, train_x: torch.Tensor) -> LaplacePosterior:
    return LaplacePosterior(ckpt.model, build_process(ckpt.config.process), train_x, **_laplace_options(cfg))


def _weight_sample_task(cfg_json: dict, state: dict | None, train_x: torch.Tensor | None, method: str, scale: float, seed: int,
                        start: int, stop: int, staging: str, part: int, solved: dict[str, Any] | None = None) -> dict[str, Any]:
    """One weight sample (one geodesic solve for Riemannian) and its share of images; with
    ``solved`` (its θ and cost, from a worker group) only the images."""
    cfg = PosteriorConfig.model_validate(cfg_json)
    ckpt = load_checkpoint(cfg.checkpoint)
    if solved is None:
        la = _posterior(cfg, ckpt, train_x)
        la.load_state_dict(state)
        ws = la.sample_one(seed, method=method, scale=scale, **_solver_options(cfg))
        net = la.apply(ws).float()
        cost = {"n_grad": ws.n_grad, "n_hvp": ws.n_hvp, "loss_increase": ws.loss_increase, "seconds": ws.seconds}
    else:
        net = with_weights(ckpt.model, solved["subset"], solved["theta"]).float()
        cost = {k: solved[k] for k in ("n_grad", "n_hvp", "loss_increase", "seconds")}
    x = generate(net, build_process(ckpt.config.process), ckpt.config.sampler, ckpt.shape, range(start, stop), cfg.seed)
    n = stop - start
    model_id = f"{ckpt.id}/{method}/{scale:g}/{seed}"
    write_part(staging, part, x, {"model_id": np.full(n, model_id), "seed": np.full(n, cfg.seed, dtype=np.int64),
                                  "weight_seed": np.full(n, seed, dtype=np.int64), "index": np.arange(start, stop)})
    return {"seed": seed, **cost}


_KEYS = ("memorised_fraction", "memorised_fraction_lo", "memorised_fraction_hi", "heldout_memorised_fraction", "authpct", "ct", "zu",
         "gap", "fd_pixels", "fd_classifier", "fid", "precision", "recall", "density", "coverage")
_COSTS = ("loss_increase", "grad_evals", "seconds_per_sample")  # what an arm's weight samples cost, as `posterior/<cost>`
ARM_TAG = "posterior_arm"  # on each arm's child run: theta_star, euclidean_0.01, ...
COLUMNS = ("params.method", "params.tau", "eval/memorised_fraction", "eval/fd_classifier", "eval/fd_pixels", "eval/precision",
           "posterior/grad_evals", "posterior/seconds_per_sample")  # the run list's: the arms side by side


def _arm_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[f"eval/{k}"]) for k in _KEYS if f"eval/{k}" in metrics}


class _Arms:
    """Evaluates each arm's pooled samples against the checkpoint's own data, each arm as a child
    run of the job's run (same metric keys and params ``method`` and ``tau`` in every arm, so
    MLflow's compare view and its charts set the arms side by side)."""

    def __init__(self, cfg: PosteriorConfig, root: Path, train: ArrayDataset, heldout: ArrayDataset, tracker: Tracker,
                 tags: dict[str, str]):
        self.cfg, self.root, self.train, self.heldout, self.tracker, self.tags = cfg, root, train, heldout, tracker, tags
        self.metrics_cfg = MetricsConfig(seed=cfg.seed, features=cfg.features)

    def _record(self, folder: Path | str, row: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the arm, then log it as its own run: the evaluation as `genmem evaluate` logs
        one (``eval/*``, figures, copy tests), its weight samples' cost as ``posterior/*``."""
        ev = evaluate_samples(read_shards(folder), self.train, self.heldout, self.metrics_cfg, cache_dir=storage_root() / "features",
                              search=neighbour_search(self.metrics_cfg, len(self.train)))
        row = {**row, **_arm_metrics(ev.metrics)}
        name = _arm_name(row)
        params = {"method": row["arm"], "tau": row["scale"], "weight_samples": 0 if name == "theta_star" else self.cfg.samples,
                  "n": self.cfg.n, "checkpoint_id": self.tags["checkpoint_id"]}
        with job_run("posterior", _arm_title(row), params=params, parent_run_id=self.tracker.run_id,
                     tags={**self.tags, ARM_TAG: name, "samples": uri_of(folder)}) as arm:
            log_evaluation(arm, ev, self.metrics_cfg)
            arm.metrics({f"posterior/{k}": row[k] for k in _COSTS})
            arm.describe(headlines.arm(_arm_title(row), ev.metrics))
        return {**row, "mlflow_run_id": arm.run_id}

    def theta_star(self) -> dict[str, Any]:
        star = sample(self.cfg.checkpoint, self.cfg.n, self.root / "theta_star", seed=self.cfg.seed)
        row = self._record(star["samples"], {"arm": "theta_star", "scale": 0.0, "loss_increase": 0.0, "grad_evals": 0.0,
                                             "seconds_per_sample": 0.0})
        self.fd_key = primary_fd({f"eval/{k}": v for k, v in row.items() if k in _KEYS}).removeprefix("eval/")
        return row

    def weight_arm(self, method: str, scale: float, state_ref, train_ref, solved: dict | None = None) -> dict[str, Any]:
        """``solved``: (method, scale, seed) → θ and cost from a worker group; else each task solves its own."""
        cfg = self.cfg
        staging = self.root / f".{method}-{scale:g}.staging"
        ranges = split_ranges(cfg.n, cfg.samples)
        seeds = weight_seeds(cfg)
        calls = [(cfg.model_dump(mode="json"), state_ref, train_ref, method, scale, seeds[k], a, b, uri_of(staging), k,
                  None if solved is None else solved[(method, scale, seeds[k])]) for k, (a, b) in enumerate(ranges)]
        folder = self.root / f"{method}-{scale:g}"
        try:
            stats = map_tasks(_weight_sample_task, calls, num_cpus=1, desc=f"{method} τ={scale:g}", unit="weight sample")
            seal_shards(staging, folder, source=f"posterior:{self.tags['checkpoint_id']}", split="samples",
                        extra={"method": method, "scale": scale, "weight_samples": stats})
        finally:
            remove(staging)  # the parts, here and (under a remote store) there
        return self._record(folder, {"arm": method, "scale": scale,
                                     "loss_increase": float(np.mean([s["loss_increase"] for s in stats])),
                                     "grad_evals": float(np.mean([s["n_grad"] + s["n_hvp"] for s in stats])),
                                     "seconds_per_sample": float(np.mean([s["seconds"] for s in stats]))})


def weight_seeds(cfg: PosteriorConfig) -> list[int]:
    """The seed of the k-th weight sample of every arm (the same initial velocities across methods)."""
    return [derive_seed(cfg.seed, Stream.WEIGHTS, k) for k in range(cfg.samples)]


def _solve_on_workers(cfg: PosteriorConfig, tracker) -> tuple[float, dict]:
    """Fit and every weight sample on one worker group; (α, (method, scale, seed) → θ and cost)."""
    from genmem.distributed.posterior import posterior_on_workers

    requests = [{"seed": seed, "method": m, "scale": s} for m in cfg.methods for s in cfg.scales for seed in weight_seeds(cfg)]
    out = posterior_on_workers(cfg.checkpoint, samples=requests, scaling=cfg.scaling, laplace=_laplace_options(cfg),
                               solver=_solver_options(cfg), optimize_prior=cfg.optimize_prior,
                               run_name=f"posterior-{uuid.uuid4().hex[:8]}")
    tracker.metrics({"posterior/workers": out["workers"]})
    solved = {(r["method"], r["scale"], r["seed"]): {**r, "theta": theta, "subset": out["subset"]}
              for r, theta in zip(out["samples"], out["thetas"])}
    return out["prior_precision"], solved


def run(cfg: PosteriorConfig, ctx: Context) -> dict[str, Any]:
    check_reachable()
    meta, train, heldout = training_data(cfg.checkpoint)  # refuses a checkpoint without manifest
    grouped = cfg.scaling.num_workers > 1
    if grouped:
        if cfg.scaling.num_workers > len(train):
            raise ConfigError(f"scaling.num_workers={cfg.scaling.num_workers} is more than the {len(train)} training points of "
                              f"{cfg.checkpoint}: use at most {len(train)} workers")
        model = load_checkpoint(cfg.checkpoint).model
        select_parameters(model, cfg.subset if cfg.subset is not None else default_subset(model))  # names what exists
    else:
        la = _posterior(cfg, load_checkpoint(cfg.checkpoint), train.x)  # refuses an unknown subset pattern, naming what exists
    ensure_ray()
    root = ensure_writable(storage_root() / "posterior" / f"{meta['checkpoint_id']}-{uuid.uuid4().hex[:6]}")
    tags = {"checkpoint_id": meta["checkpoint_id"], "samples_root": uri_of(root), **ctx.tags}
    if meta.get("mlflow_run_id"):
        tags["train_run_id"] = meta["mlflow_run_id"]
    with job_run("posterior", f"posterior-{meta['checkpoint_id']}", params=tracked(cfg), tags=tags, columns=COLUMNS,
                 parent_run_id=ctx.parent_run_id, key=ctx.key) as tracker:
        tracker.text(to_yaml(cfg), "posterior.yaml")
        if grouped:
            prior_precision, solved = _solve_on_workers(cfg, tracker)
            state_ref = train_ref = None
        else:
            la.fit()
            if cfg.optimize_prior:
                la.optimize_prior_precision()
            prior_precision, solved = la.prior_precision, None
            state_ref, train_ref = ray.put(la.state_dict()), ray.put(train.x)
        if cfg.optimize_prior:  # a result then; otherwise the param prior_precision says it
            tracker.metrics({"posterior/prior_precision": prior_precision})
        arms = _Arms(cfg, root, train, heldout, tracker, {k: v for k, v in tags.items() if k != "samples_root"})
        rows = [arms.theta_star()]
        rows += [arms.weight_arm(method, scale, state_ref, train_ref, solved) for method in cfg.methods for scale in cfg.scales]
        result = {"mlflow_run_id": tracker.run_id, "prior_precision": prior_precision, "fd_key": arms.fd_key, "arms": rows}
        tracker.image("memorised_vs_fd", _scale_figure(rows, arms.fd_key))
        tracker.text(format_table(result), "arms.txt")
        tracker.describe(headlines.posterior(rows, arms.fd_key))
    return result


def _arm_name(row: dict[str, Any]) -> str:
    return row["arm"] if row["arm"] == "theta_star" else f"{row['arm']}_{row['scale']:g}"


def _arm_title(row: dict[str, Any]) -> str:
    """The arm's run name: ``θ*``, ``riemannian τ=0.01``."""
    return "θ*" if row["arm"] == "theta_star" else f"{row['arm']} τ={row['scale']:g}"


def _scale_figure(rows: list[dict[str, Any]], fd_key: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for method, colour in (("euclidean", "#1f77b4"), ("riemannian", "#d62728"), ("linearised", "#2ca02c")):
        pts = sorted((r["scale"], r[fd_key], r["memorised_fraction"], r.get("precision", 1.0)) for r in rows if r["arm"] == method)
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", c=colour, label=method)
            for s, x, y, precision in pts:  # an arm whose samples are not data copies nothing: say so, not "0"
                degenerate = precision < headlines.DEGENERATE_PRECISION
                ax.annotate(f"τ={s:g}" + ("\ndegenerate" if degenerate else ""), (x, y), fontsize=10, color="0.4" if degenerate else "k")
                if degenerate:
                    ax.scatter([x], [y], s=90, facecolors="white", edgecolors=colour, zorder=3)
    star = [r for r in rows if r["arm"] == "theta_star"][0]
    ax.scatter([star[fd_key]], [star["memorised_fraction"]], marker="*", s=120, c="k", label="θ*", zorder=3)
    log_where_decades(ax, xs=[r[fd_key] for r in rows], ys=[r["memorised_fraction"] for r in rows])
    ax.set_xlabel(fd_key)
    ax.set_ylabel("memorised fraction")
    ax.set_title(f"copying against quality per posterior arm (hollow: degenerate, precision < {headlines.DEGENERATE_PRECISION:g})", fontsize=10)
    ax.legend(fontsize=10)
    return figure_to_array(fig)


def format_table(result: dict[str, Any]) -> str:
    """The arms side by side, as the quickstart prints them."""
    fd = result["fd_key"]
    head = (f"{'arm':<12}{'scale':>8}{'memorised':>11}{'95% interval':>16}{'C_T':>8}{'auth %':>8}{fd:>15}{'precision':>11}{'recall':>8}"
            f"{'loss +':>10}{'grad+HVP':>10}{'s/sample':>10}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in result["arms"]:
        span = f"[{r.get('memorised_fraction_lo', nan):.3f}, {r.get('memorised_fraction_hi', nan):.3f}]"
        lines.append(f"{r['arm']:<12}{r['scale']:>8g}{r['memorised_fraction']:>11.3f}{span:>16}{r.get('ct', nan):>8.2f}{r.get('authpct', nan):>8.1f}"
                     f"{r.get(fd, nan):>15.2f}{r.get('precision', nan):>11.3f}{r.get('recall', nan):>8.3f}"
                     f"{r['loss_increase']:>10.1f}{r['grad_evals']:>10.0f}{r['seconds_per_sample']:>10.1f}")
    lines.append("C_T < 0: samples closer to train than held-out data is (copying); > 0: farther (underfitting). "
                 "auth %: samples outside every training point's own neighbourhood.")
    return "\n".join(lines)


def final_report(result: dict[str, Any]) -> dict[str, float]:
    """One Tune report: every arm's numbers under ``<arm>/`` (``<method>/`` alone when the trial
    has one scale, ``<method>_<scale>/`` otherwise)."""
    scales = {r["scale"] for r in result["arms"] if r["arm"] != "theta_star"}
    out: dict[str, float] = {}
    for row in result["arms"]:
        arm = row["arm"] if row["arm"] == "theta_star" or len(scales) == 1 else _arm_name(row)
        out |= {f"{arm}/{k}": v for k, v in numeric(row).items() if k != "scale"}
    return out


def report_points(run: RunView) -> list[Point]:
    """An arm's run: θ* (the base) or one (method, τ); the job's own run holds no point."""
    arm, method = run.tags.get(ARM_TAG), run.params.get("method")
    if arm is None or method is None:
        return []
    fields = (dict(method="posterior θ*", setting="θ*", base=True) if arm == "theta_star"
              else dict(method=f"posterior/{method}", setting=f"τ={float(run.params['tau']):g}"))
    p = run.point(run.metrics, "eval/", model=run.tags.get("checkpoint_id", ""), **fields)
    return [p] if p else []


_REPORTED = re.compile(r"^(theta_star|euclidean|riemannian|linearised)(_[0-9.e+-]+)?/[a-z_]+$")

JOB = Job(
    command=COMMANDS["posterior"],
    config=PosteriorConfig,
    run=run,
    # One worker: the driver fits the curvature itself, one weight-sample task runs beside it at
    # a time. N workers: the driver waits on its group of N.
    footprint=lambda cfg: (Footprint({"CPU": 1.0}, {"CPU": 1.0}, 1) if cfg.scaling.num_workers <= 1
                           else Footprint({"CPU": 0.1}, worker_bundle(cfg.scaling), cfg.scaling.num_workers, cfg.scaling.placement_strategy,
                                          cfg.scaling.check_resources)),
    metrics=_REPORTED,
    final_report=final_report,
    table=format_table,
    report_points=report_points,
)

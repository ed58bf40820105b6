"""`genmem finetune`: reward fine-tuning with a KL or f-divergence regulariser, by adjoint
matching (METHODS.md §Regularised reward fine-tuning) on Ray. Base checkpoint in, fine-tuned
checkpoint out:

1. ``eval_n`` base samples from Ray sampling tasks (the "before" column; for an f-divergence
   they also fix the normaliser c of p* = p_pre (f')⁻¹((r - c)/α));
2. the base network fine-tuned on Ray Train workers by the training loop with the adjoint-matching
   objective: each batch is a batch of trajectories of the current model's memoryless chain;
   the loop logs mean reward, path KL and diversity with the loss, and every
   ``eval_every_images`` a probe of ``probe_n`` ODE samples logs what step 3 measures
   (``eval/*``: reward, quality, memorised fraction, on 2-D the MMD to p*);
3. the same ``eval_n`` samples from the fine-tuned model: reward, diversity (mean pairwise
   distance; precision/recall against the base's samples), quality against the data (FD on
   classifier features for labelled images, MMD in 2-D), memorised fraction (does chasing the
   reward make the model copy?), on 2-D the MMD to the exact p* (base samples reweighted), and
   the path KL of the fine-tuned chain; one MLflow run with the metrics and before/after figures
   (on 2-D also the sampled density beside the exact p*).

Usage::

    genmem finetune --config configs/finetune_toy.yaml --set base=CHECKPOINT alpha=0.5
"""

from __future__ import annotations

import importlib
import uuid
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from genmem.checkpoint import load_checkpoint, read_meta
from genmem.config import ScalingConfig, Strict, TrainConfig, to_yaml
from genmem.data import ArrayDataset
from genmem.distributed.sampling import sample_once
from genmem.errors import ConfigError
from genmem.evaluation import training_data
from genmem.generative import build_process, derive_seed, generate
from genmem.jobs.base import Context, Flag, Job, numeric
from genmem.methods.finetune import (
    DIVERGENCES,
    AdjointMatching,
    ClassLogProb,
    FinetuneObjective,
    Linear,
    Memoryless,
    Quadratic,
    Region,
    Surrogate,
    check_bounded,
    check_reward,
    divergence,
    normaliser,
    pairwise_distance,
    tilt_weights,
)
from genmem.metrics.features import get_extractor
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.memorisation import memorisation
from genmem.metrics.prdc import prdc
from genmem.metrics.two_d import mmd_rbf
from genmem.storage import check_storage, ensure_writable, storage_root, storage_uri, uri_of
from genmem.report import Point, before_and_after
from genmem.runs.curves import curves_against
from genmem.runs.training import derived_tree, footprint, train_model
from genmem.tracking import RunView, Tracker, check_reachable, job_run
from genmem.viz import densities, line_panels, side_by_side

_EVAL, _TARGET, _KL, _PROBE = 1, 2, 3, 4


class RewardConfig(Strict):
    """The reward r(x) -> (batch,), differentiable: ``linear`` aᵀx, ``quadratic``
    -(x - m)ᵀA(x - m)/2, ``region`` a smoothed indicator of the box [lo, hi], ``class`` the
    log-probability of ``target`` under the dataset's classifier (the ``classifier`` feature
    extractor's network), or ``function`` a user's ``module:function``."""

    kind: Literal["linear", "quadratic", "region", "class", "function"] = "linear"
    a: list[float] | None = None
    A: list[list[float]] | None = None
    m: list[float] | None = None
    lo: list[float] | None = None
    hi: list[float] | None = None
    smoothness: float = Field(0.1, gt=0)
    target: str | int | None = None
    function: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @model_validator(mode="after")
    def _complete(self) -> "RewardConfig":
        needs = {"linear": ("a",), "quadratic": ("A", "m"), "region": ("lo", "hi"), "class": ("target",), "function": ("function",)}[self.kind]
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ValueError(f"reward.kind={self.kind} needs reward.{missing[0]}")
        return self


class FinetuneConfig(Strict):
    name: str = Field("finetune", pattern=r"^[A-Za-z0-9_.-]+$")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    base: str  # the base checkpoint (a folder or URI written by genmem train)
    reward: RewardConfig
    divergence: str = "kl"  # kl, chi2, reverse_kl or hellinger
    alpha: float = Field(1.0, gt=0)  # α: the regulariser's weight; large keeps the base
    seed: int = 0
    steps: int = Field(32, ge=2)  # memoryless chain steps
    loss_steps: int | None = Field(8, gt=0)  # chain steps per trajectory in the loss (None: all)
    images: int = Field(64_000, gt=0)  # training budget in trajectories
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-4, gt=0)
    eval_n: int = Field(2000, gt=5)
    eval_every_images: int = Field(16_000, ge=0)  # trajectories between probes of quality and copying; 0 = off
    probe_n: int = Field(500, gt=5)  # samples per probe
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    @model_validator(mode="after")
    def _known_divergence(self) -> "FinetuneConfig":
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence '{self.divergence}': choose one of {', '.join(DIVERGENCES)}")
        return self


def build_reward(cfg: RewardConfig, train: ArrayDataset) -> nn.Module:
    """The reward module for data like ``train`` (a class reward trains or loads the dataset's
    classifier from the features cache)."""
    dim = int(torch.tensor(train.shape).prod())

    def vector(name: str, values: list[float]) -> torch.Tensor:
        if len(values) != dim:
            raise ConfigError(f"reward.{name} has {len(values)} entries but the base's samples have {dim} dimensions")
        return torch.tensor(values)

    if cfg.kind == "linear":
        return Linear(vector("a", cfg.a))
    if cfg.kind == "quadratic":
        A = torch.tensor(cfg.A)
        if A.shape != (dim, dim):
            raise ConfigError(f"reward.A has shape {tuple(A.shape)} but the base's samples need ({dim}, {dim})")
        return Quadratic(A, vector("m", cfg.m))
    if cfg.kind == "region":
        return Region(vector("lo", cfg.lo), vector("hi", cfg.hi), cfg.smoothness)
    if cfg.kind == "class":
        if train.labels is None:
            raise ConfigError(f"reward.kind=class needs labelled data, but {train.manifest.source} has no labels: use another reward")
        k = train.label_of(cfg.target)
        if k is None:
            raise ConfigError(f"reward.target names {cfg.target!r}, which is not a class of the base's data: choose among {train.label_choices()}")
        clf = get_extractor("classifier", train=train, cache_dir=storage_root() / "features")
        return ClassLogProb(nn.Sequential(clf.net.body, clf.net.head), k)
    module, _, name = cfg.function.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward.function {cfg.function} cannot be imported ({err}): give an importable module:function") from err
    return _Function(fn)


def upper_bound(reward: nn.Module) -> float | None:
    """The reward's known upper bound (None: unknown, e.g. a user's function)."""
    return getattr(reward, "upper_bound", None)


@torch.no_grad()
def rewards_of(reward: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([reward(x[i : i + 1024].float()) for i in range(0, len(x), 1024)]).double()


class _Function(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _checked(cfg: FinetuneConfig) -> tuple[dict[str, Any], ArrayDataset, ArrayDataset, nn.Module]:
    """Tracking, storage, the base and its data, and the reward (built and tried on training
    points: shape and gradient), all before any Ray work."""
    check_reachable()
    check_storage(storage_uri())
    base = read_meta(cfg.base)  # a clear error for a missing or foreign folder
    if TrainConfig.from_saved(base["config"]).source_checkpoint:
        raise ConfigError(f"base checkpoint {cfg.base} is a chained flow (an unlearning flow): fine-tune a model that starts from noise")
    _, train, heldout = training_data(cfg.base)
    reward = build_reward(cfg.reward, train)
    try:
        check_reward(reward, train.x[:4].float())
        check_bounded(divergence(cfg.divergence), upper_bound(reward))
    except ValueError as err:
        raise ConfigError(f"reward.kind={cfg.reward.kind}: {err}") from err
    if cfg.batch_size % cfg.scaling.ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by scaling.num_workers {cfg.scaling.num_workers}")
    return base, train, heldout, reward


def preflight(cfg: FinetuneConfig) -> None:
    _checked(cfg)


class ObjectiveFactory:
    """What each Ray Train worker builds its objective from (picklable): the base checkpoint,
    the reward's config and the normaliser c measured on the driver."""

    def __init__(self, cfg: FinetuneConfig, c: float):
        self.cfg, self.c = cfg, c

    def __call__(self, train_cfg: TrainConfig, train: ArrayDataset) -> FinetuneObjective:
        cfg = self.cfg
        base = load_checkpoint(cfg.base).model
        reward = build_reward(cfg.reward, train)
        div = divergence(cfg.divergence)
        surrogate = Surrogate(reward, div, cfg.alpha, self.c) if div.normalised else None
        chain = Memoryless(build_process(train_cfg.process), cfg.steps)
        return FinetuneObjective(chain, base, reward, cfg.alpha, train_cfg.batch_size, train_cfg.seed, cfg.loss_steps, surrogate)


class ProbeFactory:
    """What rank 0 builds its probe from (picklable): the measurements of step 3 on ``probe_n``
    fresh ODE samples of the network being fine-tuned (a fixed seed: successive probes differ
    only by the weights), logged as ``eval/*`` against trajectories seen."""

    def __init__(self, cfg: FinetuneConfig, c: float, before: torch.Tensor):
        self.cfg, self.c, self.before = cfg, c, before

    def __call__(self, train_cfg: TrainConfig, train: ArrayDataset, heldout: ArrayDataset):
        measure = _Measure(self.cfg, train, heldout, build_reward(self.cfg.reward, train), self.before, self.c)
        process, seed = build_process(train_cfg.process), derive_seed(self.cfg.seed, _PROBE)

        def probe(model: nn.Module, device: torch.device) -> dict[str, float]:
            x = generate(model, process, train_cfg.sampler, tuple(train.shape), range(self.cfg.probe_n), seed=seed, device=device)
            return {f"eval/{k}": v for k, v in measure(x.cpu()).items()}

        return probe


def _train_config(cfg: FinetuneConfig, base: dict[str, Any], run_name: str) -> TrainConfig:
    tree = derived_tree(base["config"], name=f"{cfg.name}-train", run_name=f"{run_name}-train", seed=cfg.seed,
                                  images=cfg.images, batch_size=cfg.batch_size, lr=cfg.lr, scaling=cfg.scaling)
    tree.update(init_from=cfg.base, eval_every_images=cfg.eval_every_images, eval_n=cfg.probe_n)
    return TrainConfig.model_validate(tree)


class _Measure:
    """Before/after measurements: reward, diversity, precision/recall against the base's own
    samples, quality against the data, memorised fraction; in 2-D the MMD to the exact p*."""

    def __init__(self, cfg: FinetuneConfig, train: ArrayDataset, heldout: ArrayDataset, reward: nn.Module, before: torch.Tensor, c: float):
        self.cfg, self.train, self.reward, self.before = cfg, train, reward, before
        self.two_d = train.x.dim() == 2 and train.x.shape[1] == 2
        self.extractor = None
        if train.x.dim() == 4 and train.labels is not None:
            self.extractor = get_extractor("classifier", train=train, cache_dir=storage_root() / "features")
        real = torch.cat([train.x, heldout.x]) if len(heldout) else train.x
        self.real_features = self.features(real)
        self.base_features = self.features(before)
        self.class_features = None  # a class reward: the real images of that class (its p* is near p(x | class))
        if self.extractor is not None and cfg.reward.kind == "class":
            labels = torch.cat([train.labels, heldout.labels]) if len(heldout) else train.labels
            self.class_features = self.features(real[labels == train.label_of(cfg.reward.target)])
        self.target, self.weights = None, None
        if self.two_d:  # the exact p* on what the base generates: its samples resampled by the tilt
            div = divergence(cfg.divergence)
            self.weights = tilt_weights(div, rewards_of(reward, before), cfg.alpha, c)
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, _TARGET))
            self.target = before[torch.multinomial(self.weights.float(), len(before), replacement=True, generator=g)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x.clamp(-3, 3)) if self.extractor is not None else x.flatten(1).float()

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        feats = self.features(x)
        out = {"reward": rewards_of(self.reward, x).mean().item(), "diversity": pairwise_distance(x),
               "memorised_fraction": memorisation(x, self.train.x).memorised_fraction}
        pr = prdc(self.base_features, feats)
        out.update(precision_vs_base=pr["precision"], recall_vs_base=pr["recall"])
        if self.extractor is not None:
            out["fd_classifier"] = frechet_distance(gaussian_stats(feats), gaussian_stats(self.real_features))
        if self.class_features is not None and len(self.class_features) > 1:
            out["fd_classifier_class"] = frechet_distance(gaussian_stats(feats), gaussian_stats(self.class_features))
        if self.two_d:
            out["mmd_data"] = mmd_rbf(x[:2000], self.train.x[:2000], bandwidth=1.0)
            out["mmd_target"] = mmd_rbf(x[:2000], self.target[:2000], bandwidth=1.0)
        return out


@torch.no_grad()
def path_kl(cfg: FinetuneConfig, checkpoint: str, n: int) -> float:
    """Mean path KL Σ ||u_k||²/2 of the fine-tuned model's memoryless chain against the base's."""
    model, base = load_checkpoint(checkpoint).model, load_checkpoint(cfg.base)
    chain = Memoryless(build_process(base.config.process), cfg.steps)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, _KL))
    shape = base.shape
    am = AdjointMatching(chain, base.model, lambda x: x.flatten(1).sum(1), cfg.alpha)
    traj = am.rollout(model.eval(), torch.randn((n, *shape), generator=g), lambda k: torch.randn((n, *shape), generator=g))
    return traj.kl.mean().item()


def run(cfg: FinetuneConfig, ctx: Context) -> dict[str, Any]:
    base, train, heldout, reward = _checked(cfg)
    run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    root = ensure_writable(storage_root() / "finetune" / run_name)
    with job_run("finetune", run_name, params=cfg.model_dump(mode="json"), tags={"base_checkpoint": str(cfg.base), **ctx.tags},
                 parent_run_id=ctx.parent_run_id, key=run_name if (cfg.run_name or ctx.key) else None) as tracker:
        tracker.text(to_yaml(cfg), "finetune.yaml")
        print(f"[genmem finetune] reward {cfg.reward.kind}, {cfg.divergence} at α={cfg.alpha:g}: {cfg.eval_n} base samples", flush=True)
        before = sample_once(cfg.base, cfg.eval_n, root / "before", seed=derive_seed(cfg.seed, _EVAL), scaling=cfg.scaling)
        try:
            c = normaliser(divergence(cfg.divergence), rewards_of(reward, before), cfg.alpha, upper_bound(reward))
        except ValueError as err:  # α too small for a divergence with a pole: known only from the base's samples
            raise ConfigError(str(err)) from err
        measure = _Measure(cfg, train, heldout, reward, before, c)
        tracker.metrics({"finetune/normaliser": c})
        trained = train_model(_train_config(cfg, base, run_name), Context(parent_run_id=tracker.run_id, tags={"finetune": run_name}),
                                        kind="finetune", objective_factory=ObjectiveFactory(cfg, c),
                                        probe_factory=ProbeFactory(cfg, c, before))
        after = sample_once(trained["checkpoint"], cfg.eval_n, root / "after", seed=derive_seed(cfg.seed, _EVAL), scaling=cfg.scaling)
        b, a = measure(before), measure(after)
        metrics = {**{f"{k}_before": v for k, v in b.items()}, **a, "path_kl": path_kl(cfg, trained["checkpoint"], min(cfg.eval_n, 1000))}
        tracker.metrics({f"finetune/{k}": v for k, v in numeric(metrics).items()})
        panels = [before, after] + ([measure.target] if measure.target is not None else [])
        titles = ["base", f"fine-tuned ({cfg.divergence}, α={cfg.alpha:g})", "exact p* (base samples reweighted)"][: len(panels)]
        tracker.image("before_after", side_by_side(panels, titles, train.x if before.dim() == 2 else None))
        if measure.two_d:  # the sampled density beside the exact p* (the base's samples weighted by the tilt)
            tracker.image("density", densities([before, after, before], ["base", titles[1], "exact p* (base samples weighted)"],
                                               [None, None, measure.weights]))
        trained_run = Tracker(trained["mlflow_run_id"])
        curves = {title: trained_run.history(key) for title, key in _TRAINING_CURVES.items()}
        curves = {title: {"": xy} for title, xy in curves.items() if xy[0]}
        if curves:
            tracker.image("curves", line_panels(curves, "trajectories seen"))
        tracker.tags({"checkpoint_uri": str(trained["checkpoint"]), "train_run_id": trained["mlflow_run_id"]})
    return {"run_name": run_name, "mlflow_run_id": tracker.run_id, "checkpoint": trained["checkpoint"], "alpha": cfg.alpha,
            "divergence": cfg.divergence, "normaliser": c, "before": uri_of(root / "before"), "after": uri_of(root / "after"),
            "train_run_id": trained["mlflow_run_id"], "metrics": metrics}


def format_table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    names = sorted({k.removesuffix("_before") for k in m if k.endswith("_before")})
    lines = [f"{'':<22}{'base':>12}{'fine-tuned':>12}"] + [f"{k:<22}{m[k + '_before']:>12.4g}{m[k]:>12.4g}" for k in names]
    lines.append(f"{'path_kl':<22}{'':>12}{m['path_kl']:>12.4g}")
    return "\n".join(lines + [f"{result['divergence']} at α={result['alpha']:g}"])


_TRAINING_CURVES = {  # panel title: the training run's metric (eval/*: the probes)
    "reward (training chain)": "finetune/reward",
    "path KL (training chain)": "finetune/path_kl",
    "diversity (training chain)": "finetune/diversity",
    "reward (probe)": "eval/reward",
    "memorised fraction (probe)": "eval/memorised_fraction",
    "FD to the data (classifier, probe)": "eval/fd_classifier",
    "FD to the target class (probe)": "eval/fd_classifier_class",
    "MMD to the data (probe)": "eval/mmd_data",
    "MMD to the exact p* (probe)": "eval/mmd_target",
    "recall against the base (probe)": "eval/recall_vs_base",
}

_CURVES = {
    "reward": lambda m: m.get("reward"),
    "path KL": lambda m: m.get("path_kl"),
    "diversity (mean pairwise distance)": lambda m: m.get("diversity"),
    "recall against the base's samples": lambda m: m.get("recall_vs_base"),
    "FD (classifier) or MMD to the data": lambda m: m.get("fd_classifier", m.get("mmd_data")),
    "memorised fraction": lambda m: m.get("memorised_fraction"),
}

REPORTS = ("reward", "reward_before", "path_kl", "diversity", "diversity_before", "recall_vs_base", "precision_vs_base",
           "fd_classifier", "fd_classifier_before", "fd_classifier_class", "fd_classifier_class_before", "mmd_data", "mmd_target", "mmd_target_before", "memorised_fraction",
           "memorised_fraction_before", "alpha")

def report_points(run: RunView) -> list[Point]:
    """The base model's samples (its θ*) and the fine-tuned model's."""
    before, after = before_and_after(run.metrics, "finetune/")
    model = run.tags.get("base_checkpoint", "")
    setting = f"α={float(run.params.get('alpha', 'nan')):g}" + (f" ({run.params['divergence']})" if "divergence" in run.params else "")
    points = [run.point(before, method="finetune θ*", setting="base", model=model, base=True),
              run.point(after, method="finetune", setting=setting, model=model)]
    return [p for p in points if p]


JOB = Job(
    name="finetune",
    help="reward fine-tuning with a KL or f-divergence regulariser (adjoint matching)",
    config=FinetuneConfig,
    run=run,
    example="alpha=0.5",
    flags=(Flag("--base", "base", help="the base checkpoint"), Flag("--alpha", "alpha", type=float, help="α: the regulariser's weight"),
           Flag("--divergence", "divergence", help=f"the regulariser: {', '.join(DIVERGENCES)}")),
    footprint=lambda cfg: footprint(TrainConfig(scaling=cfg.scaling, batch_size=cfg.batch_size)),
    preflight=preflight,
    metrics=REPORTS,
    final_report=lambda r: {**numeric(r["metrics"]), "alpha": r["alpha"]},
    table=format_table,
    report_points=report_points,
    sweep_figure=lambda space, rows: curves_against(space, rows, "alpha", _CURVES, "α"),
)

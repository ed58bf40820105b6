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

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from genmem.checkpoint import load_checkpoint
from genmem.config import ScalingConfig, Strict, TrainConfig
from genmem.data import ArrayDataset
from genmem.errors import ConfigError
from genmem.generative import build_process, derive_seed, generate
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.methods.finetune import (
    DIVERGENCES,
    AdjointMatching,
    DivergenceName,
    FinetuneObjective,
    Memoryless,
    RewardConfig,
    Surrogate,
    build_reward,
    check_bounded,
    check_reward,
    divergence,
    normaliser,
    rewards_of,
    tilt_weights,
    upper_bound,
)
from genmem.metrics.diversity import pairwise_distance
from genmem.metrics.features import get_extractor
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.memorisation import memorisation
from genmem.metrics.prdc import prdc
from genmem.metrics.two_d import mmd_rbf
from genmem.runs.before_after import Base, BeforeAfter, check_base, format_table, report_points, reported
from genmem.runs.curves import curves_against
from genmem.runs.training import footprint
from genmem.seeds import Finetune as Stream
from genmem.storage import storage_root
from genmem.tracking import Tracker
from genmem.viz import densities, line_panels, side_by_side


class FinetuneConfig(Strict):
    name: str = Field("finetune", pattern=r"^[A-Za-z0-9_.-]+$")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    base: str  # the base checkpoint (a folder or URI written by genmem train)
    reward: RewardConfig  # one registered reward's section, chosen by its kind (genmem.methods.finetune.rewards)
    divergence: DivergenceName = "kl"
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

    @field_validator("divergence", mode="before")
    @classmethod
    def _known_divergence(cls, name: Any) -> Any:
        if name not in DIVERGENCES:
            raise ValueError(f"unknown divergence '{name}': choose one of {', '.join(DIVERGENCES)}")
        return name


def _reward(cfg: FinetuneConfig, train: ArrayDataset) -> nn.Module:
    return build_reward(cfg.reward, train, cache_dir=storage_root() / "features")


def _checked(cfg: FinetuneConfig) -> tuple[Base, nn.Module]:
    """Tracking, storage, the base and its data, and the reward (built and tried on training
    points: shape and gradient), all before any Ray work."""
    base = check_base(cfg.base, cfg.batch_size, cfg.scaling)
    if TrainConfig.from_saved(base.meta["config"]).source_checkpoint:
        raise ConfigError(f"base checkpoint {cfg.base} is a chained flow (an unlearning flow): fine-tune a model that starts from noise")
    reward = _reward(cfg, base.train)
    try:
        check_reward(reward, base.train.x[:4].float())
        check_bounded(divergence(cfg.divergence), upper_bound(reward))
    except ValueError as err:
        raise ConfigError(f"reward.kind={cfg.reward.kind}: {err}") from err
    return base, reward


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
        reward = _reward(cfg, train)
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
        measure = _Measure(self.cfg, train, heldout, _reward(self.cfg, train), self.before, self.c)
        process, seed = build_process(train_cfg.process), derive_seed(self.cfg.seed, Stream.PROBE)

        def probe(model: nn.Module, device: torch.device) -> dict[str, float]:
            x = generate(model, process, train_cfg.sampler, tuple(train.shape), range(self.cfg.probe_n), seed=seed, device=device)
            return {f"eval/{k}": v for k, v in measure(x.cpu()).items()}

        return probe


class _Measure:
    """Before/after measurements: reward, diversity, precision/recall against the base's own
    samples, quality against the data, memorised fraction; in 2-D the MMD to the exact p*;
    compared, the path KL of the fine-tuned chain against the base's."""

    names = ("reward", "diversity", "memorised_fraction", "precision_vs_base", "recall_vs_base", "fd_classifier",
             "fd_classifier_class", "mmd_data", "mmd_target")
    compared = ("path_kl",)
    headline = ("reward", "memorised_fraction", "diversity", "fd_classifier", "mmd_target")

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
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, Stream.TARGET))
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

    def compare(self, before: torch.Tensor, after: torch.Tensor, checkpoint: str) -> dict[str, float]:
        return {"path_kl": path_kl(self.cfg, checkpoint, min(len(after), 1000))}


@torch.no_grad()
def path_kl(cfg: FinetuneConfig, checkpoint: str, n: int) -> float:
    """Mean path KL Σ ||u_k||²/2 of the fine-tuned model's memoryless chain against the base's."""
    model, base = load_checkpoint(checkpoint).model, load_checkpoint(cfg.base)
    chain = Memoryless(build_process(base.config.process), cfg.steps)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, Stream.KL))
    shape = base.shape
    am = AdjointMatching(chain, base.model, lambda x: x.flatten(1).sum(1), cfg.alpha)
    traj = am.rollout(model.eval(), torch.randn((n, *shape), generator=g), lambda k: torch.randn((n, *shape), generator=g))
    return traj.kl.mean().item()


COLUMNS = ("params.divergence", "params.alpha", "finetune/reward", "finetune/memorised_fraction", "finetune/diversity",
           "finetune/fd_classifier", "finetune/mmd_target")  # the run list's: the last step of each is the fine-tuned model's


def run(cfg: FinetuneConfig, ctx: Context) -> dict[str, Any]:
    base, reward = _checked(cfg)
    with BeforeAfter.open("finetune", cfg, ctx, COLUMNS) as change:
        print(f"[genmem finetune] reward {cfg.reward.kind}, {cfg.divergence} at α={cfg.alpha:g}: {cfg.eval_n} base samples", flush=True)
        before = change.samples(cfg.base, cfg.eval_n, "before", derive_seed(cfg.seed, Stream.EVAL))
        try:
            c = normaliser(divergence(cfg.divergence), rewards_of(reward, before), cfg.alpha, upper_bound(reward))
        except ValueError as err:  # α too small for a divergence with a pole: known only from the base's samples
            raise ConfigError(str(err)) from err
        measure = _Measure(cfg, base.train, base.heldout, reward, before, c)
        change.tracker.metrics({"finetune/normaliser": c})
        train_cfg = change.train_config(base, cfg, init_from=cfg.base, eval_every_images=cfg.eval_every_images, eval_n=cfg.probe_n)
        trained = change.train(train_cfg, objective_factory=ObjectiveFactory(cfg, c), probe_factory=ProbeFactory(cfg, c, before))
        after = change.samples(trained["checkpoint"], cfg.eval_n, "after", derive_seed(cfg.seed, Stream.EVAL))
        metrics = change.measure(measure, before, after, trained["checkpoint"])
        _figures(change.tracker, cfg, base, measure, before, after, trained["mlflow_run_id"])
        change.finish(trained)
    return {"run_name": change.run_name, "mlflow_run_id": change.tracker.run_id, "checkpoint": trained["checkpoint"], "alpha": cfg.alpha,
            "divergence": cfg.divergence, "normaliser": c, "before": change.uri("before"), "after": change.uri("after"),
            "train_run_id": trained["mlflow_run_id"], "metrics": metrics}


def _figures(tracker: Tracker, cfg: FinetuneConfig, base: Base, measure: _Measure, before: torch.Tensor, after: torch.Tensor,
             train_run_id: str) -> None:
    """The samples before and after (and the exact p* on 2-D, with the densities), and the
    training run's curves."""
    panels = [before, after] + ([measure.target] if measure.target is not None else [])
    titles = ["base", f"fine-tuned ({cfg.divergence}, α={cfg.alpha:g})", "exact p* (base samples reweighted)"][: len(panels)]
    tracker.image("before_after", side_by_side(panels, titles, base.train.x if before.dim() == 2 else None))
    if measure.two_d:  # the sampled density beside the exact p* (the base's samples weighted by the tilt)
        tracker.image("density", densities([before, after, before], ["base", titles[1], "exact p* (base samples weighted)"],
                                           [None, None, measure.weights]))
    trained_run = Tracker(train_run_id)
    curves = {title: trained_run.history(key) for title, key in _TRAINING_CURVES.items()}
    curves = {title: {"": xy} for title, xy in curves.items() if xy[0]}
    if curves:
        tracker.image("curves", line_panels(curves, "trajectories seen"))


def table(result: dict[str, Any]) -> str:
    return format_table(result["metrics"], "fine-tuned", f"{result['divergence']} at α={result['alpha']:g}")


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

REPORTS = reported(_Measure, "alpha")


def _setting(run) -> str:
    return f"α={float(run.params.get('alpha', 'nan')):g}" + (f" ({run.params['divergence']})" if "divergence" in run.params else "")


JOB = Job(
    command=COMMANDS["finetune"],
    config=FinetuneConfig,
    run=run,
    footprint=lambda cfg: footprint(TrainConfig(scaling=cfg.scaling, batch_size=cfg.batch_size)),
    preflight=preflight,
    metrics=REPORTS,
    final_report=lambda r: {**numeric(r["metrics"]), "alpha": r["alpha"]},
    table=table,
    report_points=lambda run: report_points(run, "finetune", _setting(run)),
    sweep_figure=lambda space, rows: curves_against(space, rows, "alpha", _CURVES, "α"),
)

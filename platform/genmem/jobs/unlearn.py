"""`genmem unlearn`: energy-weighted flow matching (METHODS.md §Unlearning) on Ray. Base
checkpoint in, unlearned checkpoint out:

1. base samples from Ray sampling tasks, kept as Parquet with provenance (x1; in ``flow`` mode
   an independent set x0 too), and ``eval_n`` samples of the base for the "before" column;
2. an energy proxy (its own seed): a retain classifier on labelled training points for a region
   or class, near-copies of the targeted training images for ``copies``; weights w = sigmoid(-λ F);
3. weighted training on Ray Train workers: ``finetune`` the base network on (noise, base sample)
   pairs, or train a new ``flow`` from base samples to base samples (sampled noise -> base -> flow);
4. the same ``eval_n`` samples from the unlearned model, measured against the base's by ground
   truth (toy regions), an independent classifier (classes) or the exact nearest-neighbour test
   (copies), never by the proxy; one MLflow run with the metrics and before/after figures.

Usage::

    genmem unlearn --config configs/unlearn_toy.yaml --set lam=5
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from genmem.checkpoint import read_meta
from genmem.config import ModelConfig, ScalingConfig, Strict, TrainConfig, to_yaml
from genmem.data import TOYS, ArrayDataset, toy_regions
from genmem.distributed.sampling import sample_once
from genmem.errors import ConfigError, DataError
from genmem.evaluation import training_data
from genmem.generative import build_process, derive_seed
from genmem.jobs.base import Context, Flag, Job, numeric
from genmem.methods.unlearning import (
    WeightedObjective,
    copies_of,
    copy_logits,
    copy_targets,
    fit_proxy,
    forgetting,
    retained_mmd,
    weights,
)
from genmem.metrics.features import get_extractor
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.memorisation import memorisation
from genmem.metrics.two_d import mmd_rbf
from genmem.storage import check_storage, ensure_writable, storage_root, storage_uri, uri_of
from genmem.report import Point, before_and_after
from genmem.runs.curves import curves_against
from genmem.runs.training import derived_tree, footprint, train_model
from genmem.tracking import RunView, check_reachable, job_run
from genmem.viz import before_after

_BASE, _SOURCE, _EVAL, _PROXY = 1, 2, 3, 4


class TargetConfig(Strict):
    """What to forget. ``region``: labels of a 2-D toy (names such as ``outer`` or indices),
    measured by ground truth; ``class``: classes of labelled data, measured by an independent
    classifier; ``copies``: the training images the base model copies (``top_k`` most copied, or
    all), measured by the exact nearest-neighbour test."""

    kind: Literal["region", "class", "copies"] = "region"
    forget: list[str | int] = Field(default_factory=list)
    top_k: int | None = Field(None, gt=0)
    threshold: float = Field(1 / 3, gt=0, lt=1)  # a copy: d1/d2 below it


class UnlearnConfig(Strict):
    name: str = Field("unlearn", pattern=r"^[A-Za-z0-9_.-]+$")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    base: str  # the base checkpoint (a folder or URI written by genmem train)
    target: TargetConfig = Field(default_factory=TargetConfig)
    mode: Literal["flow", "finetune"] = "flow"  # flow: the paper's second network; finetune: the base itself
    lam: float = Field(5.0, ge=0)  # λ: 0 keeps the base, larger forgets more
    seed: int = 0
    n_base: int = Field(4000, gt=1)  # base samples the unlearning trains on
    eval_n: int = Field(2000, gt=1)  # samples compared before and after
    images: int = Field(200_000, gt=0)  # training budget in images seen
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-3, gt=0)
    model: ModelConfig | None = None  # flow mode's network; default the base's architecture
    proxy_steps: int = Field(2000, gt=0)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)


def _labels_to_forget(cfg: UnlearnConfig, train: ArrayDataset) -> list[int]:
    """The target's labels as indices, checked against the data (one sentence each)."""
    kind, names = cfg.target.kind, train.manifest.extra.get("label_names")
    if kind == "region" and train.manifest.source not in TOYS:
        raise ConfigError(f"target.kind=region needs a 2-D toy ({', '.join(TOYS)}), but the base was trained on {train.manifest.source}: use target.kind=class")
    if train.labels is None:
        raise ConfigError(f"target.kind={kind} needs labelled data, but {train.manifest.source} has no labels: use target.kind=copies")
    if not cfg.target.forget:
        raise ConfigError(f"target.forget is empty: list the {kind}s to forget, e.g. target.forget=[{(names or ['0'])[0]}]")
    out = []
    for item in cfg.target.forget:
        k = train.label_of(item)
        if k is None:
            raise ConfigError(f"target.forget names {item!r}, which is not a {kind} of the base's data: choose among {train.label_choices()}")
        out.append(k)
    if len(set(out)) == len(set(train.labels.tolist())):
        raise ConfigError(f"target.forget lists every {kind} of the data: nothing would be left to keep")
    return sorted(set(out))


def _checked(cfg: UnlearnConfig) -> tuple[dict[str, Any], ArrayDataset, ArrayDataset, list[int]]:
    """Tracking, storage, the base checkpoint and its data, and the target, before any Ray work:
    the base's meta, its training and held-out data, and the labels to forget."""
    check_reachable()
    check_storage(storage_uri())
    base = read_meta(cfg.base)  # a clear error for a missing or foreign folder
    _, train, heldout = training_data(cfg.base)
    if tuple(base["shape"]) != tuple(train.shape):
        raise ConfigError(f"base checkpoint {cfg.base} generates shape {tuple(base['shape'])} but its data has shape {train.shape}")
    forget = _labels_to_forget(cfg, train) if cfg.target.kind != "copies" else []
    if cfg.batch_size % cfg.scaling.ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by scaling.num_workers {cfg.scaling.num_workers}")
    return base, train, heldout, forget


def preflight(cfg: UnlearnConfig) -> None:
    _checked(cfg)


class WeightsFactory:
    """What each Ray Train worker builds its objective from (picklable): the weights of the
    base samples, in the order the training set reads them, and flow mode's source samples."""

    def __init__(self, w: torch.Tensor, checksum: float, source: torch.Tensor | None):
        self.w, self.checksum, self.source = w, checksum, source

    def __call__(self, cfg: TrainConfig, train: ArrayDataset) -> WeightedObjective:
        if len(train) != len(self.w) or not np.isclose(float(train.x.double().sum()), self.checksum, rtol=1e-9, atol=1e-6):
            raise DataError("the unlearning weights do not match the base samples the worker read: rerun the job")
        return WeightedObjective(build_process(cfg.process), self.w, cfg.batch_size, cfg.seed, source=self.source)


def _proxy_logits(cfg: UnlearnConfig, train: ArrayDataset, base_x: torch.Tensor, forget: list[int]):
    """The proxy's logits on the base samples, and what the copies target picked."""
    if cfg.target.kind == "copies":
        report = memorisation(base_x, train.x, threshold=cfg.target.threshold)
        targets = copy_targets(report, cfg.target.top_k)
        if len(targets) == 0:
            raise ConfigError(f"the base model copies none of its training images among {len(base_x)} samples "
                              f"(d1/d2 < {cfg.target.threshold:.3g}): there is nothing to unlearn")
        return copy_logits(report, targets), targets
    retain = ~torch.isin(train.labels, torch.tensor(forget))
    proxy = fit_proxy(train.x, retain, seed=derive_seed(cfg.seed, _PROXY), steps=cfg.proxy_steps)
    return proxy.logits(base_x), None


def _train_config(cfg: UnlearnConfig, base: dict[str, Any], base_samples: str, run_name: str) -> TrainConfig:
    tree = derived_tree(base["config"], name=f"{cfg.name}-train", run_name=f"{run_name}-train", seed=cfg.seed,
                                  images=cfg.images, batch_size=cfg.batch_size, lr=cfg.lr, scaling=cfg.scaling)
    tree["data"] = {**tree["data"], "synthetic": [base_samples], "real": False}  # trained on base samples, measured on the real data
    if cfg.mode == "finetune":
        tree["init_from"] = cfg.base
    else:
        tree.update(source_checkpoint=cfg.base, process={"kind": "flow"},
                    sampler={"method": "heun", "steps": 16} if base["config"]["process"]["kind"] != "flow" else tree["sampler"])
        if cfg.model is not None:
            tree["model"] = cfg.model.model_dump()
    return TrainConfig.model_validate(tree)


class _Measure:
    """Before/after measurements that never use the proxy: ground-truth regions (toys), an
    independent classifier (classes: the ``classifier`` feature extractor, another seed and
    architecture), the exact nearest-neighbour test (memorisation, copies of the targets)."""

    def __init__(self, cfg: UnlearnConfig, train: ArrayDataset, heldout: ArrayDataset, forget: list[int], targets: torch.Tensor | None):
        self.cfg, self.train, self.forget, self.targets = cfg, train, forget, targets
        # FD's reference: every real image of the kept classes (train and held-out; 32 training
        # images alone would give a singular covariance)
        real = torch.cat([train.x, heldout.x]) if len(heldout) else train.x
        labels = torch.cat([train.labels, heldout.labels]) if len(heldout) and train.labels is not None else train.labels
        self.reference = real if not forget else real[~torch.isin(labels, torch.tensor(forget))]
        self.toy = train.manifest.source in TOYS
        self.images = train.x.dim() == 4
        self.extractor = None
        if self.images and train.labels is not None:
            self.extractor = get_extractor("classifier", train=train, cache_dir=storage_root() / "features")

    def labels(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.toy:
            return torch.as_tensor(toy_regions(self.train.manifest.source, x.numpy()))
        return self.extractor.predict(x) if self.extractor is not None else None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        report = memorisation(x, self.train.x, threshold=self.cfg.target.threshold)
        out = {"memorised_fraction": report.memorised_fraction}
        if self.toy:
            out["mmd"] = retained_mmd(x, self.train.x, self.train.labels, self.forget)
            kept = ~torch.isin(labels, torch.tensor(self.forget))  # what the model generates in the kept regions
            out["mmd_kept"] = retained_mmd(x[kept], self.train.x, self.train.labels, self.forget) if kept.sum() > 1 else float("nan")
        if self.extractor is not None:
            out["fd_classifier"] = frechet_distance(gaussian_stats(self.extractor(x.clamp(-3, 3))), gaussian_stats(self.extractor(self.reference)))
        if self.targets is not None:
            out["copies_of_targets"] = copies_of(report, self.targets)
        return out

    def compare(self, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
        """``<metric>_before`` and ``<metric>`` (after) for each measure, and the forgetting table."""
        lb, la = self.labels(before), self.labels(after)
        b, a = self(before, lb), self(after, la)
        out = {**{f"{k}_before": v for k, v in b.items()}, **a}
        # How far the unlearned model moved from the base (λ = 0 should not move it)
        if self.toy:
            out["mmd_to_base"] = mmd_rbf(after[:2000], before[:2000], bandwidth=1.0)
        if self.extractor is not None:
            out["fd_to_base"] = frechet_distance(gaussian_stats(self.extractor(after.clamp(-3, 3))), gaussian_stats(self.extractor(before.clamp(-3, 3))))
        if self.forget and lb is not None:
            n_labels = len(self.train.manifest.extra.get("label_names") or []) or int(self.train.labels.max()) + 1
            out.update(forgetting(lb, la, self.forget, n_labels))
        return out


def run(cfg: UnlearnConfig, ctx: Context) -> dict[str, Any]:
    base, train, heldout, forget = _checked(cfg)
    run_name = cfg.run_name or ctx.key or f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    root = ensure_writable(storage_root() / "unlearn" / run_name)
    with job_run("unlearn", run_name, params=cfg.model_dump(mode="json"), tags={"base_checkpoint": str(cfg.base), **ctx.tags},
                 parent_run_id=ctx.parent_run_id, key=run_name if (cfg.run_name or ctx.key) else None) as tracker:
        tracker.text(to_yaml(cfg), "unlearn.yaml")
        print(f"[genmem unlearn] {cfg.n_base} base samples, proxy for target {cfg.target.kind}", flush=True)
        x1 = sample_once(cfg.base, cfg.n_base, root / "base_samples", seed=derive_seed(cfg.seed, _BASE), scaling=cfg.scaling)
        # first the proxy: a base that copies nothing stops here, before any other sampling
        logits, targets = _proxy_logits(cfg, train, x1, forget)
        source = sample_once(cfg.base, cfg.n_base, root / "source_samples", seed=derive_seed(cfg.seed, _SOURCE), scaling=cfg.scaling) if cfg.mode == "flow" else None
        before = sample_once(cfg.base, cfg.eval_n, root / "before", seed=derive_seed(cfg.seed, _EVAL), scaling=cfg.scaling)
        w = weights(logits, cfg.lam)
        tracker.metrics({"unlearn/weight_mean": w.mean().item(), "unlearn/weight_min": w.min().item(),
                         "unlearn/targets": float(len(targets)) if targets is not None else 0.0})
        train_cfg = _train_config(cfg, base, uri_of(root / "base_samples"), run_name)
        factory = WeightsFactory(w, float(x1.double().sum()), source)
        trained = train_model(train_cfg, Context(parent_run_id=tracker.run_id, tags={"unlearn": run_name}),
                                        kind="unlearn", objective_factory=factory)
        after = sample_once(trained["checkpoint"], cfg.eval_n, root / "after", seed=derive_seed(cfg.seed, _EVAL), scaling=cfg.scaling)
        measure = _Measure(cfg, train, heldout, forget, targets)
        metrics = measure.compare(before, after)
        tracker.metrics({f"unlearn/{k}": v for k, v in numeric(metrics).items()})
        mask = torch.isin(train.labels, torch.tensor(forget)) if forget else None
        tracker.image("before_after", before_after(before, after, train.x if before.dim() == 2 else None, mask,
                                                   titles=("base", f"unlearned ({cfg.mode}, λ={cfg.lam:g})")))
        tracker.tags({"checkpoint_uri": str(trained["checkpoint"]), "train_run_id": trained["mlflow_run_id"]})
    return {"run_name": run_name, "mlflow_run_id": tracker.run_id, "checkpoint": trained["checkpoint"], "mode": cfg.mode, "lam": cfg.lam,
            "target": cfg.target.kind, "forget": forget, "targets": targets.tolist() if targets is not None else None,
            "base_samples": uri_of(root / "base_samples"), "before": uri_of(root / "before"), "after": uri_of(root / "after"),
            "metrics": metrics}


def format_table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    names = sorted({k.removesuffix("_before") for k in m if k.endswith("_before")})
    lines = [f"{'':<22}{'base':>12}{'unlearned':>12}"] + [f"{k:<22}{m[k + '_before']:>12.4g}{m[k]:>12.4g}" for k in names]
    lines += [f"{k:<22}{'':>12}{v:>12.4g}" for k, v in m.items() if k.startswith(("forget_ratio", "retention/"))]
    return "\n".join(lines + [f"target {result['target']} {result['forget'] or result['targets']}, mode {result['mode']}, λ={result['lam']:g}"])


# The sweep figure's panels: title -> how to read it from a trial's final report.
_CURVES = {
    "forget ratio (mass left / base's)": lambda m: m.get("forget_ratio"),
    "retention (kept mass / base's)": lambda m: m["retained_mass"] / m["retained_mass_before"] if m.get("retained_mass_before") else None,
    "MMD to the kept data": lambda m: m.get("mmd"),
    "FD (classifier) on kept classes": lambda m: m.get("fd_classifier"),
    "copies of the targets": lambda m: m.get("copies_of_targets"),
    "memorised fraction": lambda m: m.get("memorised_fraction"),
    "distance to the base (MMD or FD)": lambda m: m.get("mmd_to_base", m.get("fd_to_base")),
}


REPORTS = ("forget_mass", "forget_mass_before", "forget_ratio", "retained_mass", "retained_mass_before", "mmd", "mmd_before",
           "mmd_kept", "mmd_kept_before",
           "fd_classifier", "fd_classifier_before", "memorised_fraction", "memorised_fraction_before", "copies_of_targets",
           "copies_of_targets_before", "mmd_to_base", "fd_to_base", "lam")

def report_points(run: RunView) -> list[Point]:
    """The base model's samples (its θ*) and the unlearned model's."""
    before, after = before_and_after(run.metrics, "unlearn/")
    model = run.tags.get("base_checkpoint", "")
    setting = f"λ={float(run.params.get('lam', 'nan')):g}"
    points = [run.point(before, method="unlearn θ*", setting="base", model=model, base=True),
              run.point(after, method="unlearn", setting=setting, model=model)]
    return [p for p in points if p]


JOB = Job(
    name="unlearn",
    help="forget a region, a class or the copied training images of a base model (energy-weighted flow matching)",
    config=UnlearnConfig,
    run=run,
    example="lam=5",
    flags=(Flag("--base", "base", help="the base checkpoint"), Flag("--lam", "lam", type=float, help="λ: 0 keeps the base")),
    footprint=lambda cfg: footprint(TrainConfig(scaling=cfg.scaling, batch_size=cfg.batch_size)),
    preflight=preflight,
    metrics=REPORTS,
    final_report=lambda r: {**numeric(r["metrics"]), "lam": r["lam"]},
    table=format_table,
    report_points=report_points,
    sweep_figure=lambda space, rows: curves_against(space, rows, "lam", _CURVES, "λ"),
)

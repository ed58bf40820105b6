"""`genmem unlearn`: energy-weighted flow matching (METHODS.md §Unlearning) on Ray. Base
checkpoint in, unlearned checkpoint out:

1. base samples from Ray sampling tasks, kept as Parquet with provenance (x1; in ``flow`` mode
   an independent set x0 too), and ``eval_n`` samples of the base for the "before" column (and of
   ``reference``, exact unlearning's model, where given: trained without the forget set);
2. an energy proxy (its own seed): a retain classifier on labelled training points for a region
   or class, near-copies of the targeted training images for ``copies``; weights w = sigmoid(-λ F);
3. weighted training on Ray Train workers: ``finetune`` the base network on (noise, base sample)
   pairs, or train a new ``flow`` from base samples to base samples (sampled noise -> base -> flow),
   until the goal: every ``probe_every_images`` rank 0 measures forgetting on ``probe_n`` fresh
   samples by the same independent measure as step 4, and training ends at the first probe whose
   forget ratio (with a reference: above the reference's) is at most ``target_ratio`` with every
   kept label's retention within ``retention`` and the kept part's MMD² to the kept data within
   ``kept_tolerance`` times the base's, all judged at one-sided ``confidence`` against the
   probe's sampling noise (the ratio's upper bound at the target; no kept label, and not the kept
   part, surely outside) (tag ``ended_by=target``), or at ``max_images``
   (``ended_by=max_images``); with ``resample_every_images`` (finetune) the pool is drawn again
   from the model being trained every that many images, each pool a training run of its own
   (``accumulate_pools``: on every pool so far), the probes on the job's run as ``goal/*``;
4. the same ``eval_n`` samples from the unlearned model, measured against the base's by ground
   truth (toy regions), an independent classifier (classes) or the exact nearest-neighbour test
   (copies), never by the proxy, and with a reference the forget ratio above the reference's
   (``forget_excess``, two-sided 95% bounds); one MLflow run with the metrics and figures.

Usage::

    genmem unlearn --config configs/unlearn_toy.yaml --set lam=5
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, Literal

from torch import nn

import numpy as np
import torch
from pydantic import Field, model_validator

from genmem.config import ENDED_TAG, ModelConfig, ScalingConfig, Strict, TrainConfig
from genmem.generative import generate
from genmem.data import TOYS, ArrayDataset, toy_regions
from genmem.evaluation import training_data
from genmem.errors import ConfigError, DataError
from genmem.generative import build_process, derive_seed
from genmem.jobs.base import COMMANDS, Context, Job, numeric
from genmem.methods.unlearning import (
    KeptDistance,
    WeightedObjective,
    copies_of,
    copy_logits,
    copy_targets,
    excess_bounds,
    fit_proxies,
    forgetting,
    forgetting_bounds,
    ratio_bounds,
    retained_mmd,
    weights,
)
from genmem.metrics.features import get_extractor
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.memorisation import memorisation
from genmem.metrics.two_d import mmd_rbf
from genmem.runs.before_after import Base, BeforeAfter, check_base, format_table, report_points, reported
from genmem.runs.curves import curves_against
from genmem.runs.training import TrainJobResult, footprint
from genmem.seeds import Unlearn as Stream
from genmem.storage import storage_root
from genmem.tracking import Tracker
from genmem.viz import before_after


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
    # training ends at the first probe that reaches the goal, or at max_images
    target_ratio: float = Field(0.1, gt=0, lt=1)  # forget ratio (forget mass, or copies of the targets, over the base's)
    retention: tuple[float, float] = (0.8, 1.25)  # every kept label's share relative to the base's stays within
    # one-sided confidence of the goal's verdict against the probe's sampling noise: the forget ratio's upper
    # bound must be at most target_ratio, and no kept label surely outside `retention` (0.5: the point estimates)
    confidence: float = Field(0.95, ge=0.5, lt=1)
    # the kept part's MMD^2 to the kept data (regions: RBF on the points; classes: KID's kernel on the independent
    # classifier's standardised features) may exceed the base's by this factor: the goal fails where it is surely above
    kept_tolerance: float = Field(1.5, ge=1)
    # exact unlearning's model (genmem train on the base's data with data.exclude_labels = the forget set): the
    # goal and the report take the forget ratio above this model's, (after - reference) / before, as what is left
    # to forget, with bounds for both models' sampling noise (None: a reference that draws none of the forget set)
    reference: str | None = None
    max_images: int = Field(400_000, gt=0)  # training budget in images seen
    probe_every_images: int = Field(20_000, gt=0)
    # finetune: every this many images the pool of n_base samples is drawn again from the model being trained and
    # weighted by the same proxy, so what it newly makes near the forget region is weighted too (None: one pool, the
    # base's samples, as the paper). The U-Net digits kept 0.165 of their 8s after 200,000 images on one pool, 0.116
    # on two pools of 100,000 each
    resample_every_images: int | None = Field(None, gt=0)
    # train on every pool drawn so far, the base's first (as retrain's accumulate), instead of the last one alone
    accumulate_pools: bool = False
    probe_n: int = Field(2000, gt=1)  # samples per probe
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-3, gt=0)
    model: ModelConfig | None = None  # flow mode's network; default the base's architecture
    proxy_steps: int = Field(500, gt=0)  # per member
    proxy_members: int = Field(5, ge=1)  # retain classifiers of different seeds: a sample is kept only where all are sure
    # regions and classes: the retain logit a sample must clear to count as kept (0: P(retain) 1/2, 2: 0.88)
    proxy_margin: float = Field(2.0, ge=0)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    @model_validator(mode="after")
    def _goal(self) -> "UnlearnConfig":
        lo, hi = self.retention
        if not 0 < lo < 1 < hi:
            raise ValueError(f"retention={list(self.retention)} must bracket 1 as [low, high] with 0 < low < 1 < high, e.g. [0.8, 1.25]")
        if self.probe_every_images > self.max_images:
            raise ValueError(f"probe_every_images={self.probe_every_images} exceeds max_images={self.max_images}: no probe would "
                             "judge the goal; lower probe_every_images")
        if self.reference is not None and self.target.kind == "copies":
            raise ValueError("reference is a model trained without the forget set's labels, and target.kind=copies picks its "
                             "images from the base's samples: leave reference unset")
        if self.accumulate_pools and self.resample_every_images is None:
            raise ValueError("accumulate_pools keeps the redrawn pools, and no pool is redrawn: set resample_every_images, "
                             "e.g. 100000, or leave accumulate_pools unset")
        if self.resample_every_images is not None:
            if self.mode != "finetune":
                raise ValueError("resample_every_images redraws the pool from the network being trained, which is built for "
                                 "mode=finetune only: use mode=finetune, or leave resample_every_images unset")
            if self.probe_every_images > self.resample_every_images:
                raise ValueError(f"probe_every_images={self.probe_every_images} exceeds resample_every_images={self.resample_every_images}: "
                                 "a pool would end before its first probe; lower probe_every_images")
        return self


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


def _checked(cfg: UnlearnConfig) -> tuple[Base, list[int]]:
    """Tracking, storage, the base checkpoint and its data, the target and the reference, before
    any Ray work: the checked base and the labels to forget."""
    base = check_base(cfg.base, cfg.batch_size, cfg.scaling)
    forget = _labels_to_forget(cfg, base.train) if cfg.target.kind != "copies" else []
    if cfg.reference is not None:
        _check_reference(cfg.reference, base, forget)
    return base, forget


def _check_reference(uri: str, base: Base, forget: list[int]) -> None:
    """The reference must be trained on exactly the base's training rows less the forget set's."""
    meta, train, _ = training_data(uri)  # a clear error for a missing or foreign folder
    if tuple(meta["shape"]) != tuple(base.train.shape) or train.manifest.sha256 != base.train.without_labels(forget).manifest.sha256:
        names = base.train.manifest.extra.get("label_names")
        gone = [names[k] if names else k for k in forget]
        raise ConfigError(f"reference checkpoint {uri} was not trained on the base's training rows less the forget set's: train it "
                          f"with the base's data settings and data.exclude_labels={gone}")


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


class Proxy:
    """The energy proxy of a job, fitted once: ``logits(x)``, the retain logit of any samples
    (a pool drawn later is scored as the first was), and what the copies target picked."""

    def __init__(self, cfg: UnlearnConfig, train: ArrayDataset, base_x: torch.Tensor, forget: list[int]):
        self.train_x, self.threshold, self.margin = train.x, cfg.target.threshold, cfg.proxy_margin
        self.classifier, self.targets, self._first = None, None, None
        if cfg.target.kind == "copies":
            report = memorisation(base_x, train.x, threshold=self.threshold)
            self.targets = copy_targets(report, cfg.target.top_k)
            if len(self.targets) == 0:
                raise ConfigError(f"the base model copies none of its training images among {len(base_x)} samples "
                                  f"(d1/d2 < {self.threshold:.3g}): there is nothing to unlearn")
            self._first = (base_x, copy_logits(report, self.targets))  # the report that picked the targets scores its own samples
        else:
            retain = ~torch.isin(train.labels, torch.tensor(forget))
            self.classifier = fit_proxies(train.x, retain, seed=derive_seed(cfg.seed, Stream.PROXY), members=cfg.proxy_members,
                                          steps=cfg.proxy_steps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._first is not None and x is self._first[0]:
            return self._first[1]
        if self.classifier is None:
            return copy_logits(memorisation(x, self.train_x, threshold=self.threshold), self.targets)
        return self.classifier.logits(x) - self.margin


def _train_config(change: BeforeAfter, cfg: UnlearnConfig, base: Base, pool: int = 0, start: str | None = None,
                  images: int | None = None) -> TrainConfig:
    """Trained on the base samples (or ``pool_<k>``, drawn from ``start``), measured on the real
    data: ``finetune`` starts from ``start`` (default the base's weights); ``flow`` trains a new flow
    from base samples (its source) to base samples."""
    data = {"synthetic": [change.uri(_pool_name(k)) for k in range(0 if cfg.accumulate_pools else pool, pool + 1)], "real": False}
    budget = {"images": images or cfg.max_images, "eval_every_images": cfg.probe_every_images}
    if cfg.mode == "finetune":
        named = {"run_name": f"{change.run_name}-train-{pool + 1}"} if pool else {}
        return change.train_config(base, cfg, data=data, init_from=start or cfg.base, **named, **budget)
    sampler = {"method": "heun", "steps": 16} if base.meta["config"]["process"]["kind"] != "flow" else None
    return change.train_config(base, cfg, data=data, source_checkpoint=cfg.base, process={"kind": "flow"}, sampler=sampler,
                               model=cfg.model.model_dump() if cfg.model is not None else None, **budget)


class Judge:
    """Forgetting by the independent measure (never the proxy) on one set of samples against the
    base's: ground-truth regions (toys), an independent classifier (classes) or the exact
    nearest-neighbour test (copies of the targets); and whether it meets the goal (forget ratio
    at most ``target_ratio``, every kept label's retention within ``retention``, the kept part no
    farther from the kept data than ``kept_tolerance`` times the base's: :class:`KeptDistance`,
    for regions and classes). With ``reference`` samples (exact unlearning's model) the goal's ratio
    is the excess over the reference's, ``forget_excess``: :func:`excess_bounds`. Picklable: rank 0
    of the training run probes with it."""

    def __init__(self, cfg: UnlearnConfig, train: ArrayDataset, forget: list[int], targets: torch.Tensor | None, extractor, before: torch.Tensor,
                 reference: torch.Tensor | None = None):
        self.forget, self.targets, self.threshold = forget, targets, cfg.target.threshold
        self.target_ratio, self.bounds = cfg.target_ratio, tuple(cfg.retention)
        self.confidence, self.z = cfg.confidence, float(NormalDist().inv_cdf(cfg.confidence))
        self.toy = train.manifest.source if train.manifest.source in TOYS else None
        self.extractor = extractor
        self.n_labels = (len(train.manifest.extra.get("label_names") or []) or int(train.labels.max()) + 1) if train.labels is not None else 0
        self.train_x = train.x if targets is not None else None  # the copy test's reference
        self.before_labels = self.labels(before) if forget else None
        self.n_before = len(before)
        self.kept_tolerance, self.kept, self.kept_base = cfg.kept_tolerance, None, None
        if forget and (self.toy or extractor is not None):  # the kept part's distance to the kept data, the base's first
            kept_before = before[~torch.isin(self.before_labels, torch.tensor(forget))]
            self.kept = KeptDistance(train.x[~torch.isin(train.labels, torch.tensor(forget))], confidence=cfg.confidence,
                                     features=None if self.toy else extractor, size=min(1000, len(kept_before)),
                                     seed=derive_seed(cfg.seed, Stream.KEPT))
            self.kept_base = self.kept(kept_before)
        self.copies_before = copies_of(memorisation(before, train.x, threshold=self.threshold), targets) if targets is not None else None
        self.k_before = self.count(self.before_labels) if forget else 0
        self.reference = (self.count(self.labels(reference)), len(reference)) if reference is not None and forget else None

    def count(self, labels: torch.Tensor) -> int:
        """How many of ``labels`` are the forget set's."""
        return int(torch.isin(labels, torch.tensor(self.forget)).sum())

    def excess(self, labels: torch.Tensor, z: float) -> tuple[float, float, float]:
        """The forget ratio of samples labelled ``labels`` above the reference's, and its bounds at z."""
        return excess_bounds(self.count(labels), len(labels), *self.reference, self.k_before, self.n_before, z)

    @property
    def reference_ratio(self) -> float:
        """The reference's forget ratio: its share of the forget set over the base's."""
        return self.reference[0] / self.reference[1] / (self.k_before / self.n_before) if self.k_before else float("nan")

    def labels(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.toy:
            return torch.as_tensor(toy_regions(self.toy, x.numpy()))
        return self.extractor.predict(x) if self.extractor is not None else None

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        """``forget_ratio`` (forget mass, or copies of the targets, over the base's) and its upper
        bound ``forget_ratio_hi`` at the judge's confidence; by labels, ``retention_min``/``_max``
        over the kept labels and their bounds (:func:`forgetting_bounds`)."""
        if self.targets is not None:
            copies = copies_of(memorisation(x, self.train_x, threshold=self.threshold), self.targets)
            _, hi = ratio_bounds(copies * len(x), len(x), self.copies_before * self.n_before, self.n_before, self.z)
            return {"copies_of_targets": copies, "forget_ratio": copies / self.copies_before if self.copies_before else float("nan"),
                    "forget_ratio_hi": hi}
        labels = self.labels(x)
        m = forgetting(self.before_labels, labels, self.forget, self.n_labels)
        bounds = forgetting_bounds(self.before_labels, labels, self.forget, self.n_labels, self.z)
        kept = [v for k, v in m.items() if k.startswith("retention/") and np.isfinite(v)]
        out = {"forget_mass": m["forget_mass"], "forget_ratio": m["forget_ratio"], "forget_ratio_hi": bounds["forget_ratio_hi"],
               "retention_min": min(kept, default=float("nan")), "retention_max": max(kept, default=float("nan")),
               "retention_min_hi": bounds["retention_min_hi"], "retention_max_lo": bounds["retention_max_lo"]}
        if self.kept is not None:
            out["kept_mmd"], out["kept_mmd_lo"], out["kept_mmd_hi"] = self.kept(x[~torch.isin(labels, torch.tensor(self.forget))])
        if self.reference is not None:
            out["forget_excess"], _, out["forget_excess_hi"] = self.excess(labels, self.z)
        return out

    def reached(self, m: dict[str, float]) -> tuple[bool, str]:
        """Whether ``m`` (what :meth:`__call__` returned) meets the goal, and one clause of why.
        With bounds in ``m`` the verdict allows for the probe's sampling noise: the forget ratio's
        (with a reference: its excess over the reference's) upper bound must be at most the target, and a kept label is out of bounds only where its
        own bound says so; without them (or at confidence 0.5) the point estimates decide."""
        (lo, hi), text = self.bounds, f"forget ratio {m.get('forget_ratio', float('nan')):.3f}"
        key = "forget_excess" if self.reference is not None else "forget_ratio"
        ratio = m.get(key, float("nan"))
        ratio_hi = m.get(f"{key}_hi", ratio)
        noisy = f"{key}_hi" in m and self.z > 0
        if key == "forget_excess":
            text += f", {ratio:.3f} above the reference's {self.reference_ratio:.3f}"
        text += (f" (at most {ratio_hi:.3f} at {self.confidence:.0%})" if noisy else "")
        text += f" {'<=' if ratio_hi <= self.target_ratio else '>'} target {self.target_ratio:g}"
        if "retention_min" not in m:
            return bool(ratio_hi <= self.target_ratio), text
        low, high = m.get("retention_min_hi", m["retention_min"]), m.get("retention_max_lo", m["retention_max"])
        kept_ok = bool(lo <= low and high <= hi)
        text += f", retention {m['retention_min']:.2f}-{m['retention_max']:.2f} "
        text += (("no kept label surely" if kept_ok else "a kept label surely") + f" outside [{lo:g}, {hi:g}]" if noisy
                 else f"{'within' if kept_ok else 'outside'} [{lo:g}, {hi:g}]")
        close, clause = self._kept_close(m, noisy)
        return bool(ratio_hi <= self.target_ratio and kept_ok and close), text + clause

    def _kept_close(self, m: dict[str, float], noisy: bool) -> tuple[bool, str]:
        """Whether the kept part is no farther from the kept data than ``kept_tolerance`` times
        the base's, failing only where surely farther (the probe's lower bound above the tolerance
        times the base's upper bound; the point values at confidence 0.5), and the clause saying so."""
        if "kept_mmd" not in m or self.kept_base is None:
            return True, ""
        base, _, base_hi = self.kept_base
        value, bound = (m.get("kept_mmd_lo", m["kept_mmd"]), base_hi) if noisy else (m["kept_mmd"], base)
        close = not value > self.kept_tolerance * max(bound, 0.0)  # nan (no kept samples) is no evidence
        verdict = ("not surely above" if close else "surely above") if noisy else ("within" if close else "above")
        return close, f", kept MMD² {m['kept_mmd']:.2g} {verdict} {self.kept_tolerance:g}x the base's {base:.2g}"


class GoalFactory:
    """What rank 0 of the training run builds its probe from (picklable): the judge and how many
    samples each probe draws (a fixed seed, so successive probes differ only by the weights)."""

    def __init__(self, judge: Judge, n: int, seed: int):
        self.judge, self.n, self.seed = judge, n, seed

    def __call__(self, train_cfg: TrainConfig, train: ArrayDataset, heldout: ArrayDataset) -> "GoalProbe":
        return GoalProbe(self, train_cfg, tuple(train.shape))


class GoalProbe:
    """The training loop's :class:`genmem.training.Goal`: forgetting on fresh samples of the model
    being trained (``eval/forget_ratio``, ``eval/retention_min``/``max``), and whether it is reached."""

    def __init__(self, factory: GoalFactory, train_cfg: TrainConfig, shape: tuple[int, ...]):
        self.factory, self.cfg, self.shape, self.process = factory, train_cfg, shape, build_process(train_cfg.process)

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        f = self.factory
        x = generate(model, self.process, self.cfg.sampler, self.shape, range(f.n), seed=f.seed, device=device)
        return {f"eval/{k}": v for k, v in f.judge(x.cpu()).items()}

    def reached(self, measured: dict[str, float]) -> tuple[bool, str]:
        return self.factory.judge.reached({k.removeprefix("eval/"): v for k, v in measured.items()})


class _Measure:
    """Before/after measurements that never use the proxy: ground-truth regions (toys), an
    independent classifier (classes: the ``classifier`` feature extractor, another seed and
    architecture), the exact nearest-neighbour test (memorisation, copies of the targets)."""

    names = ("memorised_fraction", "mmd", "mmd_kept", "fd_classifier", "copies_of_targets")
    # how far the unlearned model moved from the base (λ = 0 should not move it), and the forgetting table
    compared = ("mmd_to_base", "fd_to_base", "forget_mass", "forget_mass_before", "forget_ratio", "forget_ratio_lo", "forget_ratio_hi",
                "forget_ratio_reference", "forget_excess", "forget_excess_lo", "forget_excess_hi", "retained_mass", "retained_mass_before",
                "retention/")
    headline = ("forget_mass", "retained_mass", "memorised_fraction", "fd_classifier", "mmd_kept")

    def __init__(self, cfg: UnlearnConfig, base: Base, forget: list[int], targets: torch.Tensor | None, judge: Judge):
        train, heldout = base.train, base.heldout
        self.cfg, self.train, self.forget, self.targets, self.judge = cfg, train, forget, targets, judge
        # FD's reference: every real image of the kept classes (train and held-out; 32 training
        # images alone would give a singular covariance)
        real = torch.cat([train.x, heldout.x]) if len(heldout) else train.x
        labels = torch.cat([train.labels, heldout.labels]) if len(heldout) and train.labels is not None else train.labels
        self.reference = real if not forget else real[~torch.isin(labels, torch.tensor(forget))]
        self.toy = train.manifest.source in TOYS
        self.extractor, self.labels = judge.extractor, judge.labels

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        report = memorisation(x, self.train.x, threshold=self.cfg.target.threshold)
        out = {"memorised_fraction": report.memorised_fraction}
        if self.toy:
            out["mmd"] = retained_mmd(x, self.train.x, self.train.labels, self.forget)
            kept = ~torch.isin(self.labels(x), torch.tensor(self.forget))  # what the model generates in the kept regions
            out["mmd_kept"] = retained_mmd(x[kept], self.train.x, self.train.labels, self.forget) if kept.sum() > 1 else float("nan")
        if self.extractor is not None:
            out["fd_classifier"] = frechet_distance(gaussian_stats(self.extractor(x.clamp(-3, 3))), gaussian_stats(self.extractor(self.reference)))
        if self.targets is not None:
            out["copies_of_targets"] = copies_of(report, self.targets)
        return out

    def compare(self, before: torch.Tensor, after: torch.Tensor, checkpoint: str) -> dict[str, float]:
        out = {}
        if self.toy:
            out["mmd_to_base"] = mmd_rbf(after[:2000], before[:2000], bandwidth=1.0)
        if self.extractor is not None:
            out["fd_to_base"] = frechet_distance(gaussian_stats(self.extractor(after.clamp(-3, 3))), gaussian_stats(self.extractor(before.clamp(-3, 3))))
        lb = self.judge.before_labels  # the judge labelled these same samples
        if self.forget and lb is not None:
            la = self.labels(after)
            out.update(forgetting(lb, la, self.forget, self.judge.n_labels))
            z = NormalDist().inv_cdf(0.975)  # two-sided 95%
            bounds = forgetting_bounds(lb, la, self.forget, self.judge.n_labels, z=z)
            out.update(forget_ratio_lo=bounds["forget_ratio_lo"], forget_ratio_hi=bounds["forget_ratio_hi"])
            if self.judge.reference is not None:
                out["forget_ratio_reference"] = self.judge.reference_ratio
                out["forget_excess"], out["forget_excess_lo"], out["forget_excess_hi"] = self.judge.excess(la, z)
        return out


def _extractor(train: ArrayDataset):
    """The independent classifier of labelled images (the ``classifier`` feature extractor,
    cached under the storage root), or None for points and unlabelled data."""
    if train.x.dim() == 4 and train.labels is not None:
        return get_extractor("classifier", train=train, cache_dir=storage_root() / "features")
    return None


COLUMNS = ("params.lam", "unlearn/forget_ratio", "unlearn/memorised_fraction", "unlearn/fd_classifier", "unlearn/mmd_kept",
           "unlearn/copies_of_targets")  # the run list's: the last step of each is the unlearned model's


GOAL_CURVES = ("forget_ratio", "forget_ratio_hi", "forget_excess", "forget_excess_hi")  # the probes' figures the job's run holds


def _goal_curves(change: BeforeAfter, trained: TrainJobResult, offset: int) -> None:
    """A training run's probes on the job's run as ``goal/<figure>`` at the images spent over
    every pool so far (``offset`` before this one), so one chart holds the whole trajectory."""
    run = Tracker(trained["mlflow_run_id"], trained["tracking_uri"])
    for name in GOAL_CURVES:
        for step, value in zip(*run.history(f"eval/{name}")):
            change.tracker.metrics({f"goal/{name}": value}, step=offset + step)


def _pool_name(pool: int) -> str:
    return "base_samples" if pool == 0 else f"pool_{pool + 1}"  # as its training run, <run>-train-<pool + 1>


def _train_pools(change: BeforeAfter, cfg: UnlearnConfig, base: Base, proxy: Proxy, x1: torch.Tensor, source: torch.Tensor | None,
                 probes: "GoalFactory") -> TrainJobResult:
    """Weighted training until the goal or ``max_images``: on the base's samples alone, or with
    ``resample_every_images`` on pools drawn in turn from the model being trained, each pool a
    training run (``<run>-train``, ``<run>-train-2``, ...) that starts from the last one's weights
    and EMA, its samples kept as ``pool_2``, ``pool_3``, ... (``accumulate_pools``: trained on with
    every earlier pool's rows, the base's first). The pool's mean and least weight go to
    the job's run at step k (k pools redrawn), its probes to the job's run as ``goal/*`` curves;
    the result is the last run's, with the images and the reason counted over every pool."""
    per_pool = cfg.resample_every_images or cfg.max_images
    spent, pool, start, pools = 0, 0, None, []
    while True:
        w = weights(proxy.logits(x1), cfg.lam)
        change.tracker.metrics({"unlearn/weight_mean": w.mean().item(), "unlearn/weight_min": w.min().item()}, step=pool)
        pools = [*pools, (x1, w)] if cfg.accumulate_pools else [(x1, w)]  # in the order the training set lists their rows
        rows, w = torch.cat([x for x, _ in pools]), torch.cat([v for _, v in pools])
        trained = change.train(_train_config(change, cfg, base, pool, start, min(per_pool, cfg.max_images - spent)),
                               objective_factory=WeightsFactory(w, float(rows.double().sum()), source), probe_factory=probes,
                               announce=cfg.resample_every_images is None)
        _goal_curves(change, trained, spent)
        spent += trained["images_seen"]
        if trained["ended_by"] == "target" or cfg.max_images - spent < cfg.probe_every_images:  # no probe would judge a shorter pool
            break
        pool, start = pool + 1, trained["checkpoint"]
        print(f"[genmem unlearn] pool {pool} done at {spent:,} images ({(trained['ended_by_reason'] or '').partition(': ')[2]}); "
              f"pool {pool + 1}: {cfg.n_base} samples of the model", flush=True)
        x1 = change.samples(start, cfg.n_base, _pool_name(pool), derive_seed(cfg.seed, Stream.BASE, pool))
    if pool:  # the reason counts every pool's images
        clause = (trained["ended_by_reason"] or "").partition(": ")[2]
        head = f"reached at {spent:,} images seen" if trained["ended_by"] == "target" else f"not reached in {spent:,} images"
        trained = {**trained, "images_seen": spent, "ended_by": trained["ended_by"] or "max_images",
                   "ended_by_reason": f"{head} over {pool + 1} pools: {clause}"}
    if cfg.resample_every_images is not None:
        print(f"[genmem unlearn] ended by {trained['ended_by']}: the goal was {trained['ended_by_reason']}", flush=True)
    return trained


def run(cfg: UnlearnConfig, ctx: Context) -> dict[str, Any]:
    base, forget = _checked(cfg)
    seed = lambda stream: derive_seed(cfg.seed, stream)  # noqa: E731
    with BeforeAfter.open("unlearn", cfg, ctx, COLUMNS) as change:
        print(f"[genmem unlearn] {cfg.n_base} base samples, proxy for target {cfg.target.kind}", flush=True)
        x1 = change.samples(cfg.base, cfg.n_base, "base_samples", seed(Stream.BASE))
        # first the proxy: a base that copies nothing stops here, before any other sampling
        proxy = Proxy(cfg, base.train, x1, forget)
        targets = proxy.targets
        source = change.samples(cfg.base, cfg.n_base, "source_samples", seed(Stream.SOURCE)) if cfg.mode == "flow" else None
        before = change.samples(cfg.base, cfg.eval_n, "before", seed(Stream.EVAL))
        # exact unlearning's samples, from the same noise as the before and after columns
        reference = change.samples(cfg.reference, cfg.eval_n, "reference", seed(Stream.EVAL)) if cfg.reference is not None else None
        change.tracker.metrics({"unlearn/targets": float(len(targets)) if targets is not None else 0.0})
        judge = Judge(cfg, base.train, forget, targets, _extractor(base.train), before, reference)
        if judge.kept_base is not None:  # what the goal's kept clause holds the probes to
            change.tracker.metrics({"unlearn/kept_mmd_base": judge.kept_base[0], "unlearn/kept_mmd_base_hi": judge.kept_base[2]})
        trained = _train_pools(change, cfg, base, proxy, x1, source, GoalFactory(judge, cfg.probe_n, seed(Stream.PROBE)))
        change.tracker.tags({ENDED_TAG: trained["ended_by"], f"{ENDED_TAG}_reason": trained["ended_by_reason"]})
        change.tracker.metrics({"unlearn/images_spent": float(trained["images_seen"])})
        after = change.samples(trained["checkpoint"], cfg.eval_n, "after", seed(Stream.EVAL))
        metrics = change.measure(_Measure(cfg, base, forget, targets, judge), before, after, trained["checkpoint"],
                                 note=f"training ended by {trained['ended_by']}: the goal was {trained['ended_by_reason']}")
        mask = torch.isin(base.train.labels, torch.tensor(forget)) if forget else None
        change.tracker.image("before_after", before_after(before, after, base.train.x if before.dim() == 2 else None, mask,
                                                          titles=_panel_titles(cfg, metrics)))
        change.finish(trained)
    return {"run_name": change.run_name, "mlflow_run_id": change.tracker.run_id, "checkpoint": trained["checkpoint"], "mode": cfg.mode,
            "lam": cfg.lam, "target": cfg.target.kind, "forget": forget, "targets": targets.tolist() if targets is not None else None,
            "base_samples": change.uri("base_samples"), "before": change.uri("before"), "after": change.uri("after"), "metrics": metrics,
            "ended_by": trained["ended_by"], "ended_by_reason": trained["ended_by_reason"], "images_seen": trained["images_seen"]}


def _panel_titles(cfg: UnlearnConfig, m: dict[str, float]) -> tuple[str, str]:
    """``base`` and ``unlearned (flow, λ=5)``, each over the figures its panel shows."""
    def figures(suffix: str) -> str:
        parts = [f"{label} {fmt(m[key + suffix])}" for key, label, fmt in (
            ("forget_mass", "forget mass", "{:.3f}".format), ("copies_of_targets", "copies of targets", "{:.3f}".format),
            ("memorised_fraction", "memorised", lambda v: f"{100 * v:.1f}%")) if key + suffix in m]
        if not suffix and "forget_ratio" in m:
            parts.append(f"ratio {m['forget_ratio']:.3f}" + (f" (reference {m['forget_ratio_reference']:.3f})" if "forget_ratio_reference" in m else ""))
        return ", ".join(parts)

    return f"base\n{figures('_before')}", f"unlearned ({cfg.mode}, λ={cfg.lam:g})\n{figures('')}"


def table(result: dict[str, Any]) -> str:
    return format_table(result["metrics"], "unlearned", f"target {result['target']} {result['forget'] or result['targets']}, "
                        f"mode {result['mode']}, λ={result['lam']:g}; ended by {result['ended_by']}: the goal was {result['ended_by_reason']}")


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


REPORTS = reported(_Measure, "lam")


JOB = Job(
    command=COMMANDS["unlearn"],
    config=UnlearnConfig,
    run=run,
    footprint=lambda cfg: footprint(TrainConfig(scaling=cfg.scaling, batch_size=cfg.batch_size)),
    preflight=preflight,
    metrics=REPORTS,
    final_report=lambda r: {**numeric(r["metrics"]), "lam": r["lam"]},
    table=table,
    report_points=lambda run: report_points(run, "unlearn", f"λ={float(run.params.get('lam', 'nan')):g}"),
    sweep_figure=lambda space, rows: curves_against(space, rows, "lam", _CURVES, "λ"),
)

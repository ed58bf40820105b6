"""Unlearning by energy-weighted flow matching (ContinualFlow; METHODS.md §Unlearning). Library
code in pure torch: the energy and its weights, the weighted objective the training loop takes,
the energy proxies (a retain classifier, near-copies of targeted training images) and the
before/after measurements. The job (base samples on Ray, training on Ray Train, MLflow) is
``genmem.jobs.unlearn``.

An energy proxy gives l(x), the logit of P(retain | x). F(x) = softplus(-l(x)) is high where x
should be forgotten, w(x) = sigmoid(-λ F(x)), and flow matching with per-sample weights w(x1)
(normalised by their sum) moves the model toward q ∝ p_base w: the base softly minus the forget
region (λ = 0: w = 1/2 everywhere, the base itself).

Usage::

    proxy = fit_proxy(train.x, retain=~forget_mask, seed=1)
    w = weights(proxy.logits(base_samples), lam=5.0)
    objective = WeightedObjective(build_process(cfg.process), w, cfg.batch_size, cfg.seed)
    train_loop(cfg, base_samples_dataset, reporter, objective=objective)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genmem.generative import Process, derive_seed
from genmem.metrics.frechet import mmd_bounds
from genmem.metrics.memorisation import MemorisationReport
from genmem.metrics.two_d import mmd_rbf, rbf_kernel
from genmem.seeds import UnlearningProxy as Stream
from genmem.training import Batch, global_positions

COPY_SHARPNESS = 4.0  # logit slope in log(d1/d2): a copy at half the threshold has F ≈ 2.8


def energy(logit: Tensor) -> Tensor:
    """F(x) = softplus(-l(x)): about 0 where x is surely retained, growing where it is not."""
    return F.softplus(-logit)


def weights(logit: Tensor, lam: float) -> Tensor:
    """w(x) = sigmoid(-λ F(x)), in (0, 1/2]; λ = 0 gives 1/2 everywhere (the base)."""
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0: 0 keeps the base, larger values forget more")
    return torch.sigmoid(-lam * energy(logit))


class WeightedObjective:
    """Σ_i w(x1_i) loss_i / Σ_i w(x1_i) over the *global* batch, so N workers optimise what one
    does (each rank scales by the global weight sum; DDP averages the ranks' gradients).

    ``weights`` holds w of every training row (the rows the loop's batches index). ``source``
    (flow mode): the flow starts from these base samples instead of noise; training row r at step
    s is paired with source row (offset[r] + shift(s)) mod len(source), a pairing that does not
    depend on either sample's value and changes every step."""

    def __init__(self, process: Process, w: Tensor, batch_size: int, seed: int, source: Tensor | None = None):
        if w.dim() != 1 or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be one finite, non-negative value per training row")
        self.process, self.w, self.batch_size, self.seed, self.source = process, w.double(), batch_size, seed, source
        g = torch.Generator().manual_seed(derive_seed(seed, Stream.PAIR))
        self.offset = torch.randint(len(source), (len(w),), generator=g) if source is not None else None
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "WeightedObjective":
        self.device = torch.device(device)
        if self.source is not None:
            self.source = self.source.to(self.device)
        return self

    def source_rows(self, rows: Tensor, step: int) -> Tensor:
        shift = derive_seed(self.seed, Stream.PAIR, step) % len(self.source)
        return (self.offset[rows.cpu()] + shift) % len(self.source)

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        rows = batch.rows.cpu()
        total = self.w[global_positions(len(self.w), batch.step, self.batch_size, self.seed)].sum()
        if total <= 0:
            raise ValueError(f"every sample of the batch at step {batch.step} has weight 0: lower lam")
        x0 = batch.x0 if self.source is None else self.source[self.source_rows(rows, batch.step).to(self.device)]
        loss = self.process.loss(model, x0, batch.x1, batch.t)
        return loss * (self.w[rows] * (self.batch_size / total)).to(loss.device, loss.dtype)


class RetainClassifier(nn.Module):
    """The energy proxy for regions and classes: the logit of P(retain | x). Vectors: an MLP.
    Images (c, h, w): a small CNN (two 3x3 convolutions, the second strided, then an MLP head),
    which agrees with an independent image classifier on generated samples where an MLP does not:
    on a digits model's samples an MLP proxy kept 28% of what the evaluator calls the forgotten
    digit, this CNN 22% (its weights leave 0.024 of the training targets in that class, against
    the MLP's 0.033 and the base's 0.116). Its architecture differs from the evaluator's
    (``classifier`` features: 16-32-32 channels, max-pooling)."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 64):
        super().__init__()
        if len(shape) == 3:
            c, h, w = shape
            conv = 24
            self.net = nn.Sequential(nn.Conv2d(c, conv, 3, padding=1), nn.SiLU(), nn.Conv2d(conv, conv, 3, padding=1, stride=2), nn.SiLU(),
                                     nn.Flatten(), nn.Linear(conv * ((h + 1) // 2) * ((w + 1) // 2), hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            dim = int(np.prod(shape))
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def logits(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        self.eval()
        return torch.cat([self(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)


def fit_proxy(x: Tensor, retain: Tensor, *, seed: int, hidden: int = 64, steps: int = 2000, batch_size: int = 256, lr: float = 3e-3) -> RetainClassifier:
    """Train the retain classifier with binary cross-entropy on labelled points (its own seed)."""
    retain = torch.as_tensor(retain, dtype=torch.float32)
    if retain.min() == retain.max():
        raise ValueError("the proxy needs points to retain and points to forget: the labels hold only one kind")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, Stream.PROXY))
        proxy = RetainClassifier(tuple(x.shape[1:]), hidden)
        g = torch.Generator().manual_seed(derive_seed(seed, Stream.PROXY, 1))
        opt = torch.optim.Adam(proxy.parameters(), lr=lr)
        for _ in range(steps):
            rows = torch.randint(len(x), (batch_size,), generator=g)
            loss = F.binary_cross_entropy_with_logits(proxy(x[rows].float()), retain[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return proxy.eval().requires_grad_(False)


class ProxyEnsemble(nn.Module):
    """Retain classifiers of different seeds, retaining only where every one is sure: the logit
    is the members' minimum, so the energy is the largest member's. Classifiers of clean
    training images disagree on a model's ambiguous samples, and the independent evaluator is
    one more such classifier: on an MLP digits model's samples at λ = 5, 5 members of 500 steps
    left 0.116 (a 7) and 0.134 (an 8) of the evaluator's forget class in the reweighted base
    samples, where one member of 2,000 steps left 0.167 and 0.233 (bench/unlearn_cases.py)."""

    def __init__(self, members: Sequence[RetainClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @torch.no_grad()
    def logits(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        return torch.stack([m.logits(x, batch_size) for m in self.members]).min(0).values


def fit_proxies(x: Tensor, retain: Tensor, *, seed: int, members: int = 1, **kw) -> ProxyEnsemble:
    """``members`` retain classifiers (:func:`fit_proxy`); the first is the one ``seed`` alone gives."""
    if members < 1:
        raise ValueError(f"members={members} must be at least 1")
    return ProxyEnsemble([fit_proxy(x, retain, seed=seed if k == 0 else derive_seed(seed, Stream.PROXY, 100 + k), **kw)
                          for k in range(members)])


def copy_logits(report: MemorisationReport, targets: Tensor, sharpness: float = COPY_SHARPNESS) -> Tensor:
    """The energy proxy's logits for the copies target, from the samples' memorisation report:
    l(x) = κ (log(d1/d2) - log θ) when x's nearest training image is targeted (θ the report's
    threshold), so l < 0 exactly where x counts as a copy of a targeted image and F grows as the
    copy tightens; points nearest an untargeted image get l = +30 (retained)."""
    logit = sharpness * (report.ratio.cpu().clamp(min=1e-6).log() - np.log(report.threshold))
    targeted = torch.isin(report.nearest.cpu(), targets.cpu())
    return torch.where(targeted, logit, torch.full_like(logit, 30.0)).float()


def copy_targets(report: MemorisationReport, top_k: int | None = None) -> Tensor:
    """Training rows that the report's samples copy (d1/d2 below its threshold, that row
    nearest), most-copied first; ``top_k`` keeps the first k."""
    copied = report.nearest.cpu()[report.ratio.cpu() < report.threshold]
    rows, counts = copied.unique(return_counts=True)
    rows = rows[counts.argsort(descending=True, stable=True)]
    return rows[:top_k] if top_k is not None else rows


def copies_of(report: MemorisationReport, targets: Tensor) -> float:
    """Fraction of the report's samples that are copies of one of the ``targets`` rows."""
    copy = report.ratio.cpu() < report.threshold
    return (copy & torch.isin(report.nearest.cpu(), targets.cpu())).double().mean().item()


def label_shares(labels: Tensor, n_labels: int) -> Tensor:
    """Fraction of samples per label 0..n_labels-1 (labels < 0, outside every region, count in none)."""
    labels = torch.as_tensor(labels)
    return torch.bincount(labels[labels >= 0], minlength=n_labels)[:n_labels].double() / max(len(labels), 1)


def forgetting(before: Tensor, after: Tensor, forget: Sequence[int], n_labels: int) -> dict[str, float]:
    """Ground-truth (or independent-classifier) labels of base and unlearned samples ->
    ``forget_mass`` (share of samples in the forget labels), ``forget_ratio`` (after / before),
    ``retained_mass`` (share in retained labels: the paper's retention, by ground truth) and
    ``retention/<k>``: each retained label's share among retained samples relative to the base's
    (1 = the kept part keeps its proportions)."""
    sb, sa = label_shares(before, n_labels), label_shares(after, n_labels)
    forget_mask = torch.zeros(n_labels, dtype=torch.bool)
    forget_mask[list(forget)] = True
    keep = ~forget_mask
    out = {"forget_mass_before": sb[forget_mask].sum().item(), "forget_mass": sa[forget_mask].sum().item(),
           "retained_mass_before": sb[keep].sum().item(), "retained_mass": sa[keep].sum().item()}
    out["forget_ratio"] = out["forget_mass"] / out["forget_mass_before"] if out["forget_mass_before"] > 0 else float("nan")
    kb, ka = sb[keep] / sb[keep].sum().clamp(min=1e-12), sa[keep] / sa[keep].sum().clamp(min=1e-12)
    for k, b, a in zip(torch.nonzero(keep).flatten().tolist(), kb.tolist(), ka.tolist()):
        out[f"retention/{k}"] = a / b if b > 0 else float("nan")
    return out


def ratio_bounds(k_after: float, n_after: int, k_before: float, n_before: int, z: float) -> tuple[float, float]:
    """Bounds on the ratio of two binomial proportions, (k_after / n_after) / (k_before / n_before),
    at z standard errors of its logarithm (Katz's log interval, as scipy's ``relative_risk``): z =
    1.645 gives one-sided 95% bounds, z = 0 the ratio itself. No event after counts as half an
    event for the upper bound (the lower is then 0); none before leaves the ratio undefined (nan)."""
    if k_before <= 0 or n_after <= 0 or n_before <= 0:
        return float("nan"), float("nan")
    k = max(k_after, 0.5)
    log_ratio = np.log(k / n_after) - np.log(k_before / n_before)
    se = np.sqrt(max(1 / k - 1 / n_after, 0.0) + max(1 / k_before - 1 / n_before, 0.0))
    lo = float(np.exp(log_ratio - z * se)) if k_after > 0 else 0.0
    return lo, float(np.exp(log_ratio + z * se))


def excess_bounds(k_after: float, n_after: int, k_ref: float, n_ref: int, k_before: float, n_before: int,
                  z: float) -> tuple[float, float, float]:
    """The forget ratio above a reference model's, (p_after - p_ref) / p_before for three
    independent binomial proportions (k events in n samples each), and its bounds at z by
    Fieller's theorem for the ratio of two normal estimates, N = p_after - p_ref over D = p_before:
    the d with (N - d D)^2 <= z^2 (Var N + d^2 Var D). z = 1.645 gives one-sided 95% bounds. No
    event counts as half an event in the variances (as :func:`ratio_bounds`); no event before, or
    a p_before within z errors of 0, leaves the bounds unbounded (inf)."""
    if k_before <= 0 or min(n_after, n_ref, n_before) <= 0:
        return float("nan"), float("-inf"), float("inf")
    p = lambda k, n: k / n  # noqa: E731
    var = lambda k, n: max(k, 0.5) / n * (1 - min(max(k, 0.5) / n, 1.0)) / n  # noqa: E731
    num, den = p(k_after, n_after) - p(k_ref, n_ref), p(k_before, n_before)
    var_num, var_den = var(k_after, n_after) + var(k_ref, n_ref), var(k_before, n_before)
    a = den**2 - z**2 * var_den
    if a <= 0:
        return num / den, float("-inf"), float("inf")
    half = z * np.sqrt(max(var_num * den**2 + var_den * num**2 - z**2 * var_num * var_den, 0.0))
    return num / den, float((num * den - half) / a), float((num * den + half) / a)


def forgetting_bounds(before: Tensor, after: Tensor, forget: Sequence[int], n_labels: int, z: float) -> dict[str, float]:
    """:func:`forgetting`'s ratios with their sampling noise, from the label counts: the forget
    ratio's bounds ``forget_ratio_lo``/``_hi`` at z, and over the kept labels the lowest upper
    bound ``retention_min_hi`` and the highest lower bound ``retention_max_lo``: a kept label is
    surely below a bound b only where ``retention_min_hi`` < b, surely above only where
    ``retention_max_lo`` > b."""
    before, after = torch.as_tensor(before), torch.as_tensor(after)
    cb = torch.bincount(before[before >= 0], minlength=n_labels)[:n_labels].double()
    ca = torch.bincount(after[after >= 0], minlength=n_labels)[:n_labels].double()
    forget_mask = torch.zeros(n_labels, dtype=torch.bool)
    forget_mask[list(forget)] = True
    lo, hi = ratio_bounds(ca[forget_mask].sum().item(), len(after), cb[forget_mask].sum().item(), len(before), z)
    nb, na = cb[~forget_mask].sum().item(), ca[~forget_mask].sum().item()
    kept = [ratio_bounds(ca[k].item(), na, cb[k].item(), nb, z) for k in torch.nonzero(~forget_mask).flatten().tolist()]
    kept = [b for b in kept if np.isfinite(b[1])]
    return {"forget_ratio_lo": lo, "forget_ratio_hi": hi, "retention_min_hi": min((b[1] for b in kept), default=float("nan")),
            "retention_max_lo": max((b[0] for b in kept), default=float("nan"))}


def retained_mmd(samples: Tensor, data: Tensor, data_labels: Tensor, forget: Sequence[int], bandwidth: float = 1.0,
                 max_points: int = 2000, seed: int = 0) -> float:
    """MMD (RBF, σ = 1 as the reference code) of samples to the data of the retained regions
    (at most ``max_points`` of each, a seeded subset: the kernel matrix is quadratic)."""
    kept = data[~torch.isin(torch.as_tensor(data_labels), torch.as_tensor(list(forget), dtype=torch.long))]
    g = torch.Generator().manual_seed(seed)
    pick = lambda x: x[torch.randperm(len(x), generator=g)[:max_points]]  # noqa: E731
    return mmd_rbf(pick(samples), pick(kept), bandwidth=bandwidth)


class KeptDistance:
    """How far the kept part of a model's samples lies from the kept data, with its sampling
    noise: the unbiased MMD^2 to one seeded subset of ``size`` kept data rows, the same subset for
    every set of samples measured (the base's and each probe's compare on it), and its one-sided
    bounds at ``confidence`` by a bootstrap over the samples (:func:`mmd_bounds`, each draw as
    many rows as the estimate has). Points: the
    RBF kernel, σ = 1, as ``mmd_kept``; with ``features`` (images: the independent classifier's)
    KID's polynomial kernel on them, standardised by the kept data's mean and spread per feature
    (the median spread where a feature is flat on the data):
    on raw classifier features (norm about 68) the base's kept part read 9.6 with an upper bound
    of 108 (the U-Net digits, 3,000 samples); standardised, 1,000 of its samples read -0.002
    [-0.006, 0.003]. Picklable."""

    def __init__(self, reference: Tensor, *, confidence: float, features: Callable[[Tensor], Tensor] | None = None,
                 size: int = 1000, draws: int = 200, seed: int = 0):
        self.features, self.draws, self.seed, self.level = features, draws, seed, 2 * confidence - 1
        self.kernel = None if features is not None else partial(rbf_kernel, bandwidth=1.0)
        self.shift, self.scale = 0.0, 1.0
        ref = self._features(reference)
        if features is not None:
            spread = ref.std(0)
            typical = float(np.median(spread[spread > 0])) if (spread > 0).any() else 1.0
            # a feature flat on the kept data (a unit dead on the data: 45 of the classifier's 128) keeps the typical
            # spread: divided by its own ~0, a sample that wakes it read as an MMD^2 of -1.2 for the base's kept 7s
            self.shift, self.scale = ref.mean(0), np.where(spread > 1e-3 * typical, spread, typical)
            ref = (ref - self.shift) / self.scale
        self.reference = ref[np.random.default_rng(seed).choice(len(ref), min(size, len(ref)), replace=False)]

    def _features(self, x: Tensor) -> np.ndarray:
        x = x.detach().cpu()
        return (self.features(x.clamp(-3, 3)) if self.features is not None else x.flatten(1)).double().numpy()

    def _standardised(self, x: Tensor) -> np.ndarray:
        return (self._features(x) - self.shift) / self.scale

    def __call__(self, kept: Tensor) -> tuple[float, float, float]:
        """(MMD^2, lower bound, upper bound) of these kept samples; nan with fewer than two."""
        if len(kept) < 2:
            return float("nan"), float("nan"), float("nan")
        kernel = {"kernel": self.kernel} if self.kernel is not None else {}
        return mmd_bounds(self.reference, self._standardised(kept), draws=self.draws, subset_size=len(self.reference), seed=self.seed,
                          level=self.level, draw_rows=len(kept), **kernel)  # bounds on the estimate from every kept row (up to the pool)

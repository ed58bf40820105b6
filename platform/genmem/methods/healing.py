"""Self-healing training: a run over its memorisation budget unlearns its own copies and trains
on (``memorisation_budget.action: heal``).

At a crossing, :meth:`Healer.heal` draws ``heal.samples`` fresh samples of the current
(sampling) model, finds the training images they copy (the copies target of
:mod:`genmem.methods.unlearning`: d1/d2 below 1/3, that image nearest), and runs the
energy-weighted unlearning step in fine-tune mode on the current weights: the process's loss on
those samples weighted by w = sigmoid(-λ F), F growing as a sample's copy tightens, for
``heal.images`` images, through the same optimizer, EMA and ranks as the run. The same samples'
seeds are drawn again after the step, so the fraction and quality before and after are paired.
Training then goes on with the copied images handled by ``heal.policy``: ``keep`` them,
``downweight`` them (each row's weight the mean unlearning weight of the samples that copied it,
every other row 1/2, the weight of a sample with nothing to forget), or ``drop`` them from the
rows the sampler draws. The heals so far travel in each checkpoint's meta (``heals``), so a
resumed run handles its data as the run it continues did.

Usage::

    healer = Healer(cfg, train, heldout, history=resume.meta.get("heals") if resume else None)
    train_loop(cfg, train, reporter, heal=healer, probe=probe)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from genmem.config import TrainConfig
from genmem.data import ArrayDataset
from genmem.generative import build_process, derive_seed, generate
from genmem.methods.unlearning import WeightedObjective, copy_logits, copy_targets, weights
from genmem.metrics.frechet import frechet_distance, gaussian_stats
from genmem.metrics.memorisation import memorisation
from genmem.metrics.two_d import mmd_rbf
from genmem.seeds import Healing as Stream
from genmem.training import Engine, Objective, TrainState, draw_batch, ema_beta, train_step

__all__ = ["Heal", "Healer"]

RETAINED = 0.5  # w of a sample with nothing to forget: sigmoid(0)


@dataclass
class Heal:
    """One heal: where it happened (images seen by the run), which training rows it targeted and
    their weights under the policy, the memorised fraction and quality of the same samples
    before and after, and what it cost (images, seconds)."""

    at: int
    targets: list[int]
    target_weights: list[float]
    fraction_before: float
    fraction_after: float
    quality_key: str
    quality_before: float
    quality_after: float
    images: int
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """``heal/*`` at the step of the heal (MLflow's images-seen axis)."""
        return {"heal/memorised_fraction_before": self.fraction_before, "heal/memorised_fraction": self.fraction_after,
                f"heal/{self.quality_key}_before": self.quality_before, f"heal/{self.quality_key}": self.quality_after,
                "heal/targets": float(len(self.targets)), "heal/images": float(self.images), "heal/seconds": self.seconds}

    def summary(self) -> str:
        return (f"at {self.at} images: memorised {self.fraction_before:.3g} -> {self.fraction_after:.3g}, {self.quality_key} "
                f"{self.quality_before:.3g} -> {self.quality_after:.3g}, {len(self.targets)} training images targeted "
                f"({', '.join(map(str, self.targets[:20]))}{', ...' if len(self.targets) > 20 else ''}), {self.images} images")


class Healer:
    """Heals a run of ``cfg`` (whose ``memorisation_budget.action`` is heal) on ``train``;
    ``history``: the heals a resumed run's checkpoint recorded."""

    def __init__(self, cfg: TrainConfig, train: ArrayDataset, heldout: ArrayDataset, history: list[dict] | None = None):
        budget = cfg.memorisation_budget
        if budget is None or budget.action != "heal":
            raise ValueError("a Healer needs memorisation_budget.action=heal")
        self.cfg, self.settings, self.train = cfg, budget.heal, train
        self.process = build_process(cfg.process)
        self.reference = torch.cat([train.x, heldout.x]) if len(heldout) else train.x  # quality: against all the real data
        self.heals = [Heal(**h) for h in history or []]

    @property
    def exhausted(self) -> bool:
        return len(self.heals) >= self.settings.max_heals

    def history(self) -> list[dict]:
        """What a checkpoint records (``meta["heals"]``)."""
        return [asdict(h) for h in self.heals]

    def heal(self, state: TrainState, engine: Engine, sampling_model: Callable[[], nn.Module], seen: int) -> Heal:
        """Find what the current model copies, unlearn it on the current weights (every rank
        runs the same steps), and measure the same samples again."""
        t0 = time.perf_counter()
        k, s = len(self.heals), self.settings
        seed = derive_seed(self.cfg.seed, Stream.SAMPLES, k)
        before = self._samples(sampling_model, engine, seed)
        report = memorisation(before, self.train.x)
        targets = copy_targets(report)
        w = weights(copy_logits(report, targets), s.lam)
        self._unlearn(state, engine, before, w, derive_seed(self.cfg.seed, Stream.STEP, k))
        after = self._samples(sampling_model, engine, seed)
        key, q_before = self._quality(before)
        _, q_after = self._quality(after)
        nearest = report.nearest.cpu()
        target_w = [float(w[nearest == t].mean()) for t in targets.tolist()]
        heal = Heal(at=seen, targets=targets.tolist(), target_weights=target_w, fraction_before=report.memorised_fraction,
                    fraction_after=memorisation(after, self.train.x).memorised_fraction, quality_key=key, quality_before=q_before,
                    quality_after=q_after, images=self._steps() * self.cfg.batch_size, seconds=time.perf_counter() - t0)
        self.heals.append(heal)
        state.model.train()
        return heal

    def data(self, train_x: Tensor, objective: Objective) -> tuple[Tensor, Objective]:
        """The rows the sampler draws and the objective for training after the heals so far."""
        if not self.heals or self.settings.policy == "keep":
            return train_x, objective
        rows, w = self._targets()
        if self.settings.policy == "drop":
            keep = torch.ones(len(train_x), dtype=torch.bool)
            keep[rows] = False
            return train_x[keep.to(train_x.device)], objective
        row_w = torch.full((len(train_x),), RETAINED, dtype=torch.float64)
        row_w[rows] = w
        return train_x, WeightedObjective(self.process, row_w, self.cfg.batch_size, self.cfg.seed).to(train_x.device)

    def _targets(self) -> tuple[Tensor, Tensor]:
        """Every targeted row once, at the lowest weight any heal gave it."""
        best: dict[int, float] = {}
        for h in self.heals:
            for row, w in zip(h.targets, h.target_weights):
                best[row] = min(best.get(row, RETAINED), w)
        rows = torch.tensor(sorted(best), dtype=torch.long)
        return rows, torch.tensor([best[r] for r in sorted(best)], dtype=torch.float64)

    def _steps(self) -> int:
        return math.ceil(self.settings.images / self.cfg.batch_size)

    @torch.no_grad()
    def _samples(self, sampling_model: Callable[[], nn.Module], engine: Engine, seed: int) -> Tensor:
        model = sampling_model()
        x = generate(model, self.process, self.cfg.sampler, tuple(self.train.shape), range(self.settings.samples), seed=seed,
                     device=engine.device)
        return x.cpu()

    def _unlearn(self, state: TrainState, engine: Engine, x: Tensor, w: Tensor, seed: int) -> None:
        """Fine-tune mode of energy-weighted flow matching on the run's own network, EMA and
        optimizer: batches of (noise, sample) pairs drawn from ``seed``, the EMA's half-life at
        most a tenth of the step (so it follows within it), no warm-up, its own step count (the
        run's images seen do not move)."""
        s, cfg = self.settings, self.cfg
        step_cfg = cfg.model_copy(update={"seed": seed, "optim": cfg.optim.model_copy(update={"lr": s.lr or cfg.optim.lr, "warmup_images": 0})})
        beta = ema_beta(cfg.batch_size, max(min(cfg.ema_halflife_images, s.images // 10), 1)) if state.ema is not None else 0.0
        sub = TrainState(state.model, state.ema, state.optimizer, step=0, start_images=0)
        objective = WeightedObjective(self.process, w, cfg.batch_size, seed).to(engine.device)
        x = x.to(engine.device)
        state.model.train()
        for i in range(self._steps()):
            train_step(sub, draw_batch(x, step_cfg, i, engine), objective, step_cfg, engine, beta)

    def _quality(self, x: Tensor) -> tuple[str, float]:
        """MMD to the data for 2-D points, else the Fréchet distance in pixel space."""
        if x.dim() == 2 and x.shape[1] == 2:
            return "mmd", mmd_rbf(x[:2000], self.reference[:2000], bandwidth=1.0)
        return "fd_pixels", frechet_distance(gaussian_stats(x.flatten(1).double()), gaussian_stats(self.reference.flatten(1).double()))

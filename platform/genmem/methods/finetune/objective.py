"""Adjoint matching as an objective of genmem's one training loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genmem.generative.sampling import derive_seed
from genmem.methods.finetune.adjoint import AdjointMatching
from genmem.methods.finetune.chain import Memoryless
from genmem.methods.finetune.divergences import Surrogate
from genmem.methods.finetune.rewards import Reward
from genmem.seeds import AdjointMatching as Stream

__all__ = ["FinetuneObjective"]


class FinetuneObjective:
    """Adjoint matching as an objective of genmem's training loop: each step's batch is a batch
    of trajectories of the current model (the data rows are ignored; ``batch.x0`` is the start
    noise). Every step's noise is drawn for the global batch from (seed, step), each rank taking
    its slice, so a run is the same whatever the worker count. ``read_metrics`` gives the mean
    reward (the reward itself, also for an f-divergence's surrogate), path KL and diversity of
    the trajectories since the last log."""

    def __init__(self, chain: Memoryless, base: nn.Module, reward: Reward, alpha: float, batch_size: int, seed: int,
                 loss_steps: int | None = None, surrogate: Surrogate | None = None):
        self.am = AdjointMatching(chain, base, surrogate if surrogate is not None else reward, alpha, loss_steps)
        self.reward, self.batch_size, self.seed = reward, batch_size, seed
        self.device = torch.device("cpu")
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def to(self, device: torch.device) -> "FinetuneObjective":
        self.device = torch.device(device)
        self.am.base.to(self.device)
        for module in (self.reward, self.am.reward):
            if isinstance(module, nn.Module):
                module.to(self.device)
        return self

    def __call__(self, model: nn.Module, batch) -> Tensor:
        n, lo, shape = len(batch.x0), batch.offset, tuple(batch.x0.shape[1:])

        def noise(k: int) -> Tensor:
            g = torch.Generator().manual_seed(derive_seed(self.seed, Stream.NOISE, batch.step, k))
            return torch.randn((self.batch_size, *shape), generator=g)[lo : lo + n].to(self.device)

        traj = self.am.rollout(model, batch.x0, noise, kl=False)
        steps = torch.Generator().manual_seed(derive_seed(self.seed, Stream.STEPS, batch.step))  # the same on every rank
        loss, kl = self.am.loss_and_kl(model, traj, generator=steps)
        with torch.no_grad():
            reward = traj.reward if self.am.reward is self.reward else self.reward(traj.x1)
            self._add({"finetune/reward": reward.double().mean(), "finetune/path_kl": kl.mean(),
                       "finetune/diversity": torch.pdist(traj.x1.flatten(1).double()).mean() if n > 1 else torch.zeros((), dtype=torch.float64)})
        return loss

    def _add(self, values: dict[str, Tensor]) -> None:
        for name, v in values.items():
            self._sums[name] = self._sums.get(name, 0) + v.to(self.device)
        self._count += 1

    def read_metrics(self) -> dict[str, Tensor]:
        out = {name: (v / self._count).float() for name, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out

"""Reward fine-tuning with a KL or f-divergence regulariser, by adjoint matching (METHODS.md
§Regularised reward fine-tuning; Tang 2024; Domingo-Enrich et al., ICLR 2025). Pure torch.

The target is the maximiser of E_p[r] - α D_f(p || p_pre): p* ∝ p_pre exp(r/α) for KL, and
p* = p_pre (f')⁻¹((r - c)/α) for an f-divergence, reached by the KL machinery on the surrogate
reward r̃ = α log (f')⁻¹((r - c)/α) with c normalising p* on base samples.

One concept per module: ``chain`` (the memoryless chain), ``adjoint`` (the adjoint-matching
loss), ``divergences`` (KL and the f-divergences by their density ratio), ``rewards`` (rewards
registered by kind), ``objective`` (the loss as an objective of the training loop).

Usage::

    chain = Memoryless(FlowMatching(), steps=32)
    objective = AdjointMatching(chain, base, reward=Linear(a), alpha=1.0)
    loss = objective.loss(model, noise0, noise)      # (batch,); minimise with any optimiser
"""

from genmem.methods.finetune.adjoint import AdjointMatching, Trajectories
from genmem.methods.finetune.chain import Memoryless
from genmem.methods.finetune.divergences import (
    DIVERGENCES,
    Divergence,
    DivergenceName,
    Surrogate,
    check_bounded,
    divergence,
    normaliser,
    tilt_weights,
)
from genmem.methods.finetune.objective import FinetuneObjective
from genmem.methods.finetune.rewards import (
    REWARDS,
    ClassLogProb,
    Function,
    Linear,
    Quadratic,
    Region,
    Reward,
    RewardConfig,
    RewardModule,
    build_reward,
    check_reward,
    register,
    rewards_of,
    upper_bound,
)

__all__ = [
    "DIVERGENCES", "REWARDS", "AdjointMatching", "ClassLogProb", "Divergence", "DivergenceName", "FinetuneObjective", "Function",
    "Linear", "Memoryless", "Quadratic", "Region", "Reward", "RewardConfig", "RewardModule", "Surrogate", "Trajectories",
    "build_reward", "check_bounded", "check_reward", "divergence", "normaliser", "register", "rewards_of", "tilt_weights",
    "upper_bound",
]

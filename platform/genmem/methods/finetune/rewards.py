"""Rewards for fine-tuning, registered by ``kind`` (as jobs are): each reward is a module
r(x) -> (batch,), differentiable in x, with its own config section and ``from_config``, and the
upper bound the divergences with a pole need (None: unknown).

A new reward is one class here: subclass :class:`RewardModule`, give it a ``kind``, a ``Config``
(a :class:`~genmem.config.Strict` section whose ``kind`` is that name) and ``from_config``, and
decorate it with :func:`register`; :data:`RewardConfig` (the finetune job's ``reward`` section)
and :func:`build_reward` then take it. A user's reward outside genmem is ``kind: function`` with
``function: module:name``.

Usage::

    reward = build_reward(Linear.Config(a=[1.0, 0.0]), train)
    r = rewards_of(reward, x)  # float64, no graph
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from genmem.config import Strict
from genmem.data import ArrayDataset
from genmem.errors import ConfigError

__all__ = ["REWARDS", "ClassLogProb", "Function", "Linear", "Quadratic", "Region", "Reward", "RewardConfig", "RewardModule",
           "build_reward", "check_reward", "register", "rewards_of", "upper_bound"]

Reward = Callable[[Tensor], Tensor]  # r(x) -> (batch,), differentiable in x


class RewardModule(nn.Module):
    """A reward that registers by ``kind``: built from its config section for data like ``data``
    (``cache_dir``: where a reward that trains a network, e.g. a classifier, caches it)."""

    kind: ClassVar[str]
    Config: ClassVar[type[Strict]]
    upper_bound: ClassVar[float | None] = None

    @classmethod
    def from_config(cls, cfg: Strict, data: ArrayDataset, cache_dir: str | Path | None = None) -> "RewardModule":
        raise NotImplementedError


REWARDS: dict[str, type[RewardModule]] = {}


def register(cls: type[RewardModule]) -> type[RewardModule]:
    """Add a reward class under its ``kind`` (its Config's ``kind`` must be that literal)."""
    if cls.kind in REWARDS:
        raise ValueError(f"a reward of kind {cls.kind!r} is already registered ({REWARDS[cls.kind].__name__})")
    if cls.Config.model_fields["kind"].default != cls.kind:
        raise ValueError(f"{cls.__name__}.Config.kind must default to {cls.kind!r}")
    REWARDS[cls.kind] = cls
    return cls


def _vector(name: str, values: list[float], data: ArrayDataset) -> Tensor:
    dim = int(torch.tensor(data.shape).prod())
    if len(values) != dim:
        raise ConfigError(f"reward.{name} has {len(values)} entries but the base's samples have {dim} dimensions")
    return torch.tensor(values)


@register
class Linear(RewardModule):
    """r(x) = aᵀx (unbounded: KL and χ² only)."""

    kind = "linear"
    upper_bound = math.inf

    class Config(Strict):
        kind: Literal["linear"] = "linear"
        a: list[float]

    def __init__(self, a: Tensor):
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg: Config, data: ArrayDataset, cache_dir: str | Path | None = None) -> "Linear":
        return cls(_vector("a", cfg.a, data))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.a.to(x.dtype)


@register
class Quadratic(RewardModule):
    """r(x) = -(x - m)ᵀ A (x - m)/2 (A symmetric positive semi-definite): with a Gaussian base
    N(μ, Σ) and KL, p* is Gaussian with precision Σ⁻¹ + A/α. Bounded above by 0."""

    kind = "quadratic"
    upper_bound = 0.0

    class Config(Strict):
        kind: Literal["quadratic"] = "quadratic"
        A: list[list[float]]
        m: list[float]

    def __init__(self, A: Tensor, m: Tensor):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float32))
        self.register_buffer("m", torch.as_tensor(m, dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg: Config, data: ArrayDataset, cache_dir: str | Path | None = None) -> "Quadratic":
        m = _vector("m", cfg.m, data)
        A = torch.tensor(cfg.A)
        if A.shape != (len(m), len(m)):
            raise ConfigError(f"reward.A has shape {tuple(A.shape)} but the base's samples need ({len(m)}, {len(m)})")
        return cls(A, m)

    def forward(self, x: Tensor) -> Tensor:
        d = x.flatten(1) - self.m.to(x.dtype)
        return -0.5 * ((d @ self.A.to(x.dtype)) * d).sum(1)


@register
class Region(RewardModule):
    """A smoothed indicator of the box lo <= x <= hi: Π_i sigmoid((x_i - lo_i)/s) sigmoid((hi_i - x_i)/s)."""

    kind = "region"
    upper_bound = 1.0

    class Config(Strict):
        kind: Literal["region"] = "region"
        lo: list[float]
        hi: list[float]
        smoothness: float = Field(0.1, gt=0)

    def __init__(self, lo: Tensor, hi: Tensor, smoothness: float = 0.1):
        super().__init__()
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("hi", torch.as_tensor(hi, dtype=torch.float32))
        self.s = smoothness

    @classmethod
    def from_config(cls, cfg: Config, data: ArrayDataset, cache_dir: str | Path | None = None) -> "Region":
        return cls(_vector("lo", cfg.lo, data), _vector("hi", cfg.hi, data), cfg.smoothness)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        inside = torch.sigmoid((x - self.lo.to(x.dtype)) / self.s) * torch.sigmoid((self.hi.to(x.dtype) - x) / self.s)
        return inside.prod(1)


@register
class ClassLogProb(RewardModule):
    """r(x) = log p(y = target | x) under a classifier returning logits (bounded above by 0);
    from a config, the dataset's own classifier (the ``classifier`` feature extractor's network,
    trained once and cached under ``cache_dir``)."""

    kind = "class"
    upper_bound = 0.0

    class Config(Strict):
        kind: Literal["class"] = "class"
        target: str | int

    def __init__(self, classifier: nn.Module, target: int):
        super().__init__()
        self.classifier, self.target = classifier.eval().requires_grad_(False), target

    @classmethod
    def from_config(cls, cfg: Config, data: ArrayDataset, cache_dir: str | Path | None = None) -> "ClassLogProb":
        from genmem.metrics.features import get_extractor  # trains a network: only when a class reward is asked for

        if data.labels is None:
            raise ConfigError(f"reward.kind=class needs labelled data, but {data.manifest.source} has no labels: use another reward")
        k = data.label_of(cfg.target)
        if k is None:
            raise ConfigError(f"reward.target names {cfg.target!r}, which is not a class of the base's data: choose among {data.label_choices()}")
        clf = get_extractor("classifier", train=data, cache_dir=cache_dir)
        return cls(nn.Sequential(clf.net.body, clf.net.head), k)

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.classifier(x), dim=1)[:, self.target]


@register
class Function(RewardModule):
    """A user's reward: ``function`` names an importable ``module:name`` taking x and returning
    (batch,), differentiable in x (checked by :func:`check_reward`); its bound is unknown."""

    kind = "function"

    class Config(Strict):
        kind: Literal["function"] = "function"
        function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    def __init__(self, fn: Reward):
        super().__init__()
        self.fn = fn

    @classmethod
    def from_config(cls, cfg: Config, data: ArrayDataset, cache_dir: str | Path | None = None) -> "Function":
        module, _, name = cfg.function.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.function {cfg.function} cannot be imported ({err}): give an importable module:function") from err
        return cls(fn)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


# The finetune job's ``reward`` section: one registered reward's config, chosen by its ``kind``.
RewardConfig = Annotated[Union[tuple(cls.Config for cls in REWARDS.values())], Field(discriminator="kind")]  # noqa: UP007


def build_reward(cfg: Strict, data: ArrayDataset, cache_dir: str | Path | None = None) -> RewardModule:
    """The reward a config section names, for data like ``data``."""
    return REWARDS[cfg.kind].from_config(cfg, data, cache_dir)


def upper_bound(reward: Reward) -> float | None:
    """The reward's known upper bound (None: unknown, e.g. a user's function)."""
    return getattr(reward, "upper_bound", None)


@torch.no_grad()
def rewards_of(reward: Reward, x: Tensor, chunk: int = 1024) -> Tensor:
    """r(x) in float64, ``chunk`` rows at a time, with no graph."""
    return torch.cat([reward(x[i : i + chunk].float()) for i in range(0, len(x), chunk)]).double()


def check_reward(reward: Reward, example: Tensor) -> None:
    """Refuse a reward that breaks the contract r(x) -> (batch,), differentiable in x (one sentence)."""
    x = example[:4].detach().clone().requires_grad_(True)
    r = reward(x)
    if not isinstance(r, Tensor) or r.shape != (len(x),):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"the reward must return one value per sample, shape ({len(x)},), but returned {shape}")
    if not r.requires_grad:
        raise ValueError("the reward has no gradient with respect to x: adjoint matching needs a differentiable reward")
    (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None or not torch.isfinite(g).all():
        raise ValueError("the reward's gradient with respect to x is missing or not finite: adjoint matching needs a differentiable reward")

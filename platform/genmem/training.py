"""The training loop over an *objective*: one function that runs as a single process here and,
unchanged, inside every Ray Train worker (genmem.distributed supplies an Accelerate engine; the
train job supplies a reporter that writes to Ray and MLflow).

An objective gives the per-sample loss of a batch and owns whatever it needs (a frozen reference
network, per-sample weights, trajectories it generates); the loop around it exists once: budget
in images seen (training sets change size across generations), EMA as a half-life in images,
linear warm-up (Karras et al. 2022), checkpoints, resume, probes.

Every random draw is derived from (seed, step): the global batch's data positions (a seeded
permutation per epoch) and its noise (x0, t) are drawn for the whole global batch and each rank
takes its slice, so a run is the same function of the seed whatever the worker count, and
resuming at a step needs no saved RNG state. The caller's global RNG is left as it was.

Usage::

    result = train_loop(cfg, train, LocalReporter(out, cfg.images))            # plain loss
    result = train_loop(cfg, train, reporter, objective=MyWeightedObjective())  # any objective
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from genmem.checkpoint import Checkpoint, chain_source, save_checkpoint
from genmem.config import BUDGET_TAG, ENDED_TAG, HEAL_TAG, BudgetConfig, TrainConfig
from genmem.data import ArrayDataset
from genmem.errors import TrainingError
from genmem.generative import Process, build_process, data_clip, derive_seed, generate
from genmem.models import build_model, count_parameters
from genmem.seeds import Training as Stream
from genmem.viz import sample_picture, save_png

__all__ = [
    "Batch", "Engine", "Goal", "LocalReporter", "Objective", "ProcessObjective", "Reporter", "TrainResult",
    "TrainingError", "global_noise", "global_positions", "train_loop",
]



class Engine:
    """How the loop touches devices and peers. This one is a single local process; the
    Accelerate engine in genmem.distributed gives DDP and mixed precision behind the same calls."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model.to(self.device), optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self) -> AbstractContextManager:
        return nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over all ranks."""
        return value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Stack a tensor from every rank along a new first axis (rank order)."""
        return value[None]


@dataclass
class Batch:
    """This rank's slice of the global batch at ``step``: data rows ``x1`` (dataset positions
    ``rows``), noise ``x0`` and times ``t``, all on the training device."""

    x1: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    rows: torch.Tensor
    step: int
    offset: int = 0  # where this rank's slice starts in the global batch


class Objective(Protocol):
    """What the loop optimises: per-sample losses of shape (batch,), unreduced (DESIGN.md).
    An objective that measures more than its loss also defines ``read_metrics()``: the means
    since its last call, {name: tensor on the device}, logged with the loss (every rank calls it)."""

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def to(self, device: torch.device) -> "Objective":
        """Place whatever the objective owns (frozen networks, weights) on the training device."""
        ...


class ProcessObjective:
    """The plain objective: the flow-matching or diffusion loss of the probability path."""

    def __init__(self, process: Process):
        self.process = process

    def to(self, device: torch.device) -> "ProcessObjective":
        return self

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.process.loss(model, batch.x0, batch.x1, batch.t)


class Reporter(Protocol):
    """Side effects of training, called on every rank (ranks > 0 usually ignore them)."""

    checkpoint_meta: dict[str, Any]  # extra fields for meta.json (e.g. the MLflow run id)

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None: ...

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None: ...

    def checkpoint_path(self, images_seen: int, final: bool) -> Path: ...

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None: ...

    def note(self, tags: dict[str, str]) -> None: ...  # facts about the run (the memorisation budget's verdict)


class LocalReporter:
    """Training side effects for a single local process: a progress bar, grid PNGs and the
    checkpoint folder (periodic checkpoints overwrite it; the last one stays)."""

    def __init__(self, output: Path, total_images: int, start_images: int = 0, quiet: bool = False):
        self.output = output
        self.checkpoint_meta: dict[str, Any] = {}
        self.grids: list[Path] = []
        self.notes: dict[str, str] = {}
        self.bar = tqdm(total=total_images, initial=start_images, unit="img", unit_scale=True, disable=quiet, desc="train")

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None:
        self.bar.update(images_seen - self.bar.n)
        if "train/loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None:
        self.grids.append(save_png(picture, self.output / "grids" / f"{name}-{images_seen:012d}.png"))

    def checkpoint_path(self, images_seen: int, final: bool) -> Path:
        return self.output / "checkpoint"

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None:
        if final:
            self.bar.update(images_seen - self.bar.n)
            self.bar.close()

    def note(self, tags: dict[str, str]) -> None:
        self.notes.update(tags)


@dataclass
class TrainResult:
    checkpoint: Path | None
    step: int
    images_seen: int
    loss: float
    parameters: int
    seconds: float
    images_per_s: float
    stopped_at: int | None = None  # images seen at the probe over the memorisation budget that ended training
    ended_by: str | None = None  # a probe with a goal: "target" (reached at ``images_seen``) or "max_images"

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "step": self.step,
            "images_seen": self.images_seen,
            "loss": self.loss,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
        }


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached: every step of an epoch reads the same permutation (read-only, never mutated).
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, Stream.DATA, epoch)))


def global_positions(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """Dataset rows of the global batch at ``step``: epoch e visits a permutation seeded by (seed, e)."""
    start = step * batch
    e0, e1 = start // n, (start + batch - 1) // n
    if e0 == e1:  # the usual case: the batch lies inside one epoch
        return _epoch_permutation(n, seed, e0)[start - e0 * n : start - e0 * n + batch]
    pos = torch.arange(start, start + batch)
    epochs, offsets = pos // n, pos % n
    rows = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        mask = epochs == e
        rows[mask] = _epoch_permutation(n, seed, e)[offsets[mask]]
    return rows


def global_noise(shape: tuple[int, ...], step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, t) for the whole global batch at ``step``."""
    g = torch.Generator().manual_seed(derive_seed(seed, Stream.NOISE, step))
    return torch.randn((batch, *shape), generator=g), torch.rand(batch, generator=g)


def ema_beta(batch: int, halflife_images: int) -> float:
    """Per-step EMA decay so that the weight of an image halves after ``halflife_images`` more."""
    return 0.5 ** (batch / halflife_images)


@dataclass
class TrainState:
    """What a step changes: the (prepared) network, its EMA, the optimizer and the step count."""

    model: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    step: int
    start_images: int
    _ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = dataclasses.field(default=None, repr=False)

    def sampling_model(self, engine: Engine) -> nn.Module:
        return self.ema if self.ema is not None else engine.unwrap(self.model)

    def ema_pairs(self, engine: Engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The EMA's parameters and the network's, listed once (parameters are updated in place)."""
        if self._ema_pairs is None:
            self._ema_pairs = (list(self.ema.parameters()), [p.detach() for p in engine.unwrap(self.model).parameters()])
        return self._ema_pairs


def restore_state(cfg: TrainConfig, shape: tuple[int, ...], engine: Engine, *,
                  resume: Checkpoint | None = None, init: Checkpoint | None = None) -> TrainState:
    """Fresh weights from (seed), or ``resume`` (weights, EMA, optimizer and step: load it with
    ``use_ema=False, with_optimizer=True``), or ``init`` (weights and EMA start a fresh run:
    fine-tuning; ignored when resuming)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Stream.INIT))  # same initial weights on every rank
        model = build_model(cfg.model, shape)
    start = resume if resume is not None else init
    if start is not None:
        model.load_state_dict(start.model.state_dict())  # raw weights: load with use_ema=False
    ema = None
    if cfg.ema_halflife_images > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if start is not None and start.ema_state is not None:
            ema.load_state_dict(start.ema_state)
        ema.to(engine.device)
    # On the device before the optimizer exists: load_state_dict places the resumed moments
    # beside their parameters, which must already be where training runs.
    model.to(engine.device)
    # Fused AdamW (one kernel over every tensor) where the device has it: the per-tensor loop of
    # the default was 40% of a small MLP's CPU step (4.2 -> 2.6 ms a step, 256x3 MLP, batch 32).
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=fused)
    if resume is not None and resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    model, optimizer = engine.prepare(model, optimizer)
    step = int(resume.meta["step"]) if resume is not None else 0
    start_images = int(resume.meta["images_seen"]) if resume is not None else 0
    return TrainState(model, ema, optimizer, step, start_images)


def draw_batch(train_x: torch.Tensor, cfg: TrainConfig, step: int, engine: Engine) -> Batch:
    """This rank's slice of the global batch at ``step`` (rows and noise from (seed, step))."""
    batch, shape = cfg.batch_size, tuple(train_x.shape[1:])
    local = batch // engine.world_size
    lo, hi = engine.rank * local, (engine.rank + 1) * local
    rows = global_positions(len(train_x), step, batch, cfg.seed)[lo:hi]
    x0, t = global_noise(shape, step, batch, cfg.seed)
    device = engine.device
    return Batch(x1=train_x[rows.to(train_x.device)], x0=x0[lo:hi].to(device), t=t[lo:hi].to(device), rows=rows, step=step, offset=lo)


def train_step(state: TrainState, batch: Batch, objective: Objective, cfg: TrainConfig, engine: Engine, beta: float) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the mean loss of this rank (detached, on device)."""
    lr_scale = min(1.0, (state.step + 1) * cfg.batch_size / cfg.optim.warmup_images) if cfg.optim.warmup_images else 1.0
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.optim.lr * lr_scale
    with engine.autocast():
        loss = objective(state.model, batch).mean()
    state.optimizer.zero_grad(set_to_none=True)
    engine.backward(loss)
    if cfg.optim.grad_clip is not None:
        engine.clip_grad_norm(state.model, cfg.optim.grad_clip)
    state.optimizer.step()
    if state.ema is not None:
        with torch.no_grad():
            torch._foreach_lerp_(*state.ema_pairs(engine), 1.0 - beta)
    state.step += 1
    return loss.detach().float()


def _marks(total: int, every: int, seen: int) -> Iterator[int]:
    """Multiples of ``every`` up to the first at or beyond ``total``, after ``seen``."""
    return iter(range((seen // every + 1) * every, total + every, every)) if every else iter(())


class Schedule:
    """When to log, draw a grid, checkpoint and probe: every N images seen, each its own N
    (0 = never before the end). ``due(seen)`` names what fell due at ``seen``."""

    def __init__(self, cfg: TrainConfig, seen: int, *, probe: bool):
        every = {"log": cfg.log_every_images, "grid": cfg.grid_every_images,
                 "checkpoint": cfg.checkpoint_every_images, "probe": cfg.eval_every_images if probe else 0}
        self._marks = {name: _marks(cfg.images, n, seen) for name, n in every.items()}
        self._next = {name: next(marks, None) for name, marks in self._marks.items()}

    def due(self, seen: int) -> list[str]:
        out = []
        for name, mark in self._next.items():
            if mark is not None and seen >= mark:
                out.append(name)
                while mark is not None and mark <= seen:
                    mark = next(self._marks[name], None)
                self._next[name] = mark
        return out


class _LossWindow:
    """Losses summed on the device since the last log: synchronised (all-reduced, and checked for
    NaN) only when read, not every step."""

    def __init__(self, engine: Engine, step: int):
        self.engine = engine
        self.sum, self.count, self.images, self.since_step = None, 0, 0, step
        self.t = time.perf_counter()
        self.last = float("nan")

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.sum = loss if self.sum is None else self.sum + loss
        self.count, self.images = self.count + 1, self.images + images

    def read(self, step: int, batch: int) -> dict[str, float]:
        """The window's mean loss over all ranks and its throughput; raises on a non-finite loss.
        An empty window (a run resumed at its end) repeats the last value, NaN if there was none."""
        if self.count:
            self.last = self.engine.mean(self.sum / self.count).item()
        if self.count and not math.isfinite(self.last):
            raise TrainingError(
                f"the training loss became {self.last} by step {step} ({step * batch} images seen; "
                f"finite up to step {self.since_step}): lower optim.lr or set optim.grad_clip"
            )
        now = time.perf_counter()
        out = {"train/loss": self.last, "train/images_per_s": self.images / max(now - self.t, 1e-9)}
        self.sum, self.count, self.images, self.t, self.since_step = None, 0, 0, now, step
        return out


class _Budget:
    """The memorisation budget at each probe: rank 0 measures, every rank learns the verdict (all
    ranks must stop at the same step), and the run is tagged at the first probe over budget."""

    def __init__(self, budget: BudgetConfig, engine: Engine, reporter: Reporter):
        self.budget, self.engine, self.reporter = budget, engine, reporter
        self.last_under: tuple[int, float] | None = None  # (images seen, memorised fraction) of the last probe under budget
        self.over_at: int | None = None  # images seen at the crossing that ended (stop) or flagged (flag) the run
        self.value = math.nan  # the last probe's memorised fraction

    def over(self, measured: dict[str, float], seen: int) -> bool:
        value = measured.get("eval/memorised_fraction", float("nan"))
        if self.engine.is_main and not math.isfinite(value):
            raise TrainingError("memorisation_budget needs the probe's eval/memorised_fraction, which this run's probe does not "
                                "measure: drop memorisation_budget for this objective")
        flag = torch.tensor(float(self.engine.is_main and value > self.budget.max_fraction), device=self.engine.device)
        over = self.engine.mean(flag).item() > 0  # rank 0's verdict, on every rank
        if not over:
            self.last_under = (seen, value)
            return False
        self.value = value
        if self.over_at is None and self.budget.action != "heal":  # a healing run notes each heal, and its stop
            self.over_at = seen
            self.note("stopped" if self.budget.action == "stop" else "over", seen)
        return True

    def note(self, verdict: str, seen: int, extra: str = "") -> None:
        """Tag the run with the verdict and why, in one sentence."""
        why = f"memorised fraction {self.value:.4g} > max_fraction {self.budget.max_fraction:g} at {seen} images seen" + extra
        if verdict == "stopped":
            why += (f"; the result is the checkpoint at {self.last_under[0]} images ({self.last_under[1]:.4g})" if self.last_under
                    else "; no probe was under budget, so the result is the model at this probe")
        self.reporter.note({BUDGET_TAG: verdict, f"{BUDGET_TAG}_reason": why})


class Goal(Protocol):
    """A probe that also says whether training has reached what it is for (unlearning: the
    forget target): ``reached(measured)`` -> (reached, one sentence of why), judged on rank 0
    from the probe's own metrics. Training ends at the first probe that reaches it."""

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    def reached(self, measured: dict[str, float]) -> tuple[bool, str]: ...


class _Ending:
    """A goal probe's verdict at each probe, the same on every rank (rank 0 judges; a worker
    without the probe learns it), and the run's tag when training ends by it or without it."""

    def __init__(self, probe: Callable | None, engine: Engine, reporter: Reporter):
        self.goal = probe if callable(getattr(probe, "reached", None)) else None
        self.engine, self.reporter = engine, reporter
        self.why = ""  # the last verdict's sentence (rank 0)
        self.ended_by: str | None = None

    def reached(self, measured: dict[str, float]) -> bool:
        done = False
        if self.goal is not None and self.engine.is_main:
            done, self.why = self.goal.reached(measured)
        if self.engine.world_size > 1:
            done = self.engine.mean(torch.tensor(float(done), device=self.engine.device)).item() > 0
        self.ended_by = "target" if done else None
        return done

    def finish(self, seen: int) -> None:
        """Training has ended (by the goal or at ``max_images``): tag the run (rank 0)."""
        if self.goal is None:
            return
        self.ended_by = self.ended_by or "max_images"
        why = (f"reached at {seen:,} images seen: {self.why}" if self.ended_by == "target"
               else f"not reached in {seen:,} images: {self.why or 'no probe ran'}")
        self.reporter.note({ENDED_TAG: self.ended_by, f"{ENDED_TAG}_reason": why})


class _Run:
    """One training run's rank-0 side effects: grids, checkpoints and probes through the reporter."""

    def __init__(self, cfg: TrainConfig, train: ArrayDataset, reporter: Reporter, engine: Engine, state: TrainState):
        self.cfg, self.train, self.reporter, self.engine, self.state = cfg, train, reporter, engine, state
        self.process = build_process(cfg.process)
        self.grid: np.ndarray | None = None
        self._source: nn.Module | None = None

    def sampling_model(self) -> nn.Module:
        """What the grid and the probe sample: the EMA network, behind its source model if it has one."""
        model = self.state.sampling_model(self.engine)
        if not self.cfg.source_checkpoint:
            return model
        if self._source is None:
            self._source = chain_source(model, self.cfg.source_checkpoint).to(self.engine.device)
        self._source.model = model
        return self._source

    @property
    def seen(self) -> int:
        return self.state.step * self.cfg.batch_size

    def probe(self, probe: Callable | None) -> dict[str, float]:
        """The probe's metrics of the sampling model (rank 0; {} elsewhere), logged."""
        measured = probe(self.sampling_model(), self.engine.device) if self.engine.is_main and probe is not None else {}
        self.reporter.log(self.state.step, self.seen, measured)
        self.state.model.train()
        return measured

    def draw_grid(self) -> None:
        if self.engine.is_main:
            cfg, shape = self.cfg, tuple(self.train.shape)
            x = generate(self.sampling_model(), self.process, cfg.sampler, shape, range(cfg.grid_size),
                         Stream.GRID, device=self.engine.device)
            self.grid = sample_picture(x, self.train.x[:2000], f"{self.seen} images", min_width=0)
            self.reporter.picture(self.state.step, self.seen, "samples", self.grid)

    def checkpoint(self, final: bool, metrics: dict[str, float]) -> Path | None:
        path = None
        if self.engine.is_main:
            s = self.state
            path = save_checkpoint(
                self.reporter.checkpoint_path(self.seen, final), self.engine.unwrap(s.model), self.cfg,
                shape=tuple(self.train.shape), step=s.step, images_seen=self.seen, data_manifest=self.train.manifest.sha256,
                ema=s.ema, optimizer=s.optimizer,
                extra={**self.reporter.checkpoint_meta, "data_range": [float(self.train.x.min()), float(self.train.x.max())]},
            )
            if final and self.grid is not None:
                save_png(self.grid, path / "samples.png")  # the checkpoint shows what it generates
        self.reporter.checkpoint(self.state.step, self.seen, metrics, path, final)
        return path


def resolve_sampler(cfg: TrainConfig, train: ArrayDataset) -> TrainConfig:
    """``cfg`` with ``sampler.clip_denoised="auto"`` made concrete from the training data
    (diffusion on images in [-1, 1]: 1; otherwise None), as checkpoints record it."""
    if cfg.sampler.clip_denoised != "auto":
        return cfg
    clip = data_clip(train.x) if cfg.process.kind == "diffusion" else None
    return cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"clip_denoised": clip})})


def train_loop(
    cfg: TrainConfig,
    train: ArrayDataset,
    reporter: Reporter,
    *,
    objective: Objective | None = None,
    engine: Engine | None = None,
    resume: Checkpoint | None = None,
    init: Checkpoint | None = None,
    probe: Callable[[nn.Module, torch.device], dict[str, float]] | Goal | None = None,
    heal: Healing | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``train`` for ``cfg.images`` images, minimising ``objective``
    (default: the loss of ``cfg.process``). ``resume``/``init``: see :func:`restore_state`.
    ``probe(model, device)``: metrics of the sampling model every ``cfg.eval_every_images``
    (rank 0; in a worker group the other ranks pass None and follow rank 0's verdicts), e.g. the
    memorised fraction; a :class:`Goal` probe ends training at the first probe that reaches its
    goal, tagging the run ``ended_by``. ``heal``: what a run over its memorisation budget does
    with ``action: heal`` (:class:`genmem.methods.healing.Healer`)."""
    engine = engine or Engine()
    cfg = resolve_sampler(cfg, train)
    if heal is not None and objective is not None:
        raise TrainingError("memorisation_budget.action=heal unlearns with the process's own loss, and this run trains another "
                            "objective: use action=stop or action=flag")
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's global RNG is left as it was
        state = restore_state(cfg, tuple(train.shape), engine, resume=resume, init=init)
        objective = (objective or ProcessObjective(build_process(cfg.process))).to(engine.device)
        return _loop(cfg, train, reporter, objective, engine, state, probe, heal)


class Healing(Protocol):
    """What the loop asks of a healer: whether it may heal again, one heal on the current
    weights (every rank), the rows and objective to train on after the heals so far, and the
    heals as a checkpoint records them."""

    @property
    def exhausted(self) -> bool: ...

    def heal(self, state: TrainState, engine: Engine, sampling_model: Callable[[], nn.Module], seen: int) -> Any: ...

    def data(self, train_x: torch.Tensor, objective: Objective) -> tuple[torch.Tensor, Objective]: ...

    def history(self) -> list[dict]: ...


def _healed(heal: Healing, budget: _Budget, state: TrainState, run: _Run, objective: Objective) -> tuple[torch.Tensor, Objective, bool]:
    """One heal at a crossing, logged and tagged, recorded for the checkpoints; the rows and
    objective to train on next, and whether the healed model is under budget (checkpoint it)."""
    done = heal.heal(state, run.engine, run.sampling_model, run.seen)
    history = heal.history()
    run.reporter.log(state.step, run.seen, done.metrics())
    run.reporter.note({f"{HEAL_TAG}_{len(history)}": done.summary()})
    budget.note("healed", run.seen, f"; heal {len(history)} of {budget.budget.heal.max_heals}: {done.summary()}")
    run.reporter.checkpoint_meta["heals"] = history
    under = done.fraction_after <= budget.budget.max_fraction
    if under:
        budget.last_under = (run.seen, done.fraction_after)
    x_all, objective = heal.data(run.train.x.to(run.engine.device), objective)
    return x_all, objective, under


def _verdict(measured: dict[str, float], budget: _Budget | None, heal: Healing | None, state: TrainState, run: _Run,
             objective: Objective, x_all: torch.Tensor) -> tuple[torch.Tensor, Objective, str]:
    """What a probe's result asks of the loop, with the rows and objective to train on next:
    ``on`` (train on), ``checkpoint`` (train on; the model is under budget, the result if a later
    probe is over), ``end`` (the last checkpoint under budget is the result) or ``end-checkpoint``
    (this model is that checkpoint)."""
    if budget is None:
        return x_all, objective, "on"
    if not budget.over(measured, run.seen):
        return x_all, objective, "checkpoint" if budget.budget.checkpoints_at_probes else "on"
    if heal is not None and not heal.exhausted:
        x_all, objective, under = _healed(heal, budget, state, run, objective)
        if len(x_all):
            return x_all, objective, "checkpoint" if under else "on"
        budget.over_at = run.seen  # `drop` has taken every training image: nothing is left to train on
        budget.note("stopped", run.seen, ": the drop policy has removed every training image")
        return x_all, objective, "end-checkpoint" if under else "end"
    if not budget.budget.checkpoints_at_probes:
        return x_all, objective, "on"  # flagged
    if budget.budget.action == "heal":  # past its last heal a healing run stops as `stop` does
        budget.over_at = run.seen
        budget.note("stopped", run.seen, f" after {len(heal.history()) if heal else 0} heals")
    return x_all, objective, "end"


def _loop(cfg, train, reporter, objective, engine, state, probe, heal=None) -> TrainResult:
    batch, total_steps = cfg.batch_size, math.ceil(cfg.images / cfg.batch_size)
    beta = ema_beta(batch, cfg.ema_halflife_images) if state.ema is not None else 0.0
    run = _Run(cfg, train, reporter, engine, state)
    # rank 0 holds the probe; in a worker group every rank comes to each probe, where it learns rank 0's verdicts
    probing = probe is not None or (engine.world_size > 1 and cfg.eval_every_images > 0)
    schedule, window = Schedule(cfg, run.seen, probe=probing), _LossWindow(engine, state.step)
    budget = _Budget(cfg.memorisation_budget, engine, reporter) if cfg.memorisation_budget and probing else None
    ending = _Ending(probe, engine, reporter)
    stop_at_budget = budget is not None and budget.budget.checkpoints_at_probes
    heal = heal if budget is not None and budget.budget.action == "heal" else None
    last_under, x_all = None, train.x.to(engine.device)  # last_under: the last checkpoint under budget
    if heal is not None:  # a resumed run trains on what its heals left
        reporter.checkpoint_meta["heals"] = heal.history()
        x_all, objective = heal.data(x_all, objective)
    ended_at_budget, t_start = False, time.perf_counter()
    state.model.train()
    while state.step < total_steps:
        if cfg.model.dropout > 0:  # dropout masks from (seed, step, rank): resumable, worker-count aware
            torch.manual_seed(derive_seed(cfg.seed, Stream.TORCH, state.step, engine.rank))
        window.add(train_step(state, draw_batch(x_all, cfg, state.step, engine), objective, cfg, engine, beta), batch)
        due = schedule.due(run.seen)
        if stop_at_budget:  # the checkpoints come at probes under budget, so the latest one is always under it
            due = [d for d in due if d != "checkpoint"]
        if "log" in due:
            # the learning rate moves only in the warm-up: without one it is the optim.lr param, no curve
            lr = {"train/lr": state.optimizer.param_groups[0]["lr"]} if cfg.optim.warmup_images > 0 else {}
            reporter.log(state.step, run.seen, {**window.read(state.step, batch), **lr, **_objective_metrics(objective, engine)})
        if "probe" in due:
            measured = run.probe(probe)
            x_all, objective, verdict = _verdict(measured, budget, heal, state, run, objective, x_all)
            if verdict.endswith("checkpoint") and state.step < total_steps:
                due.append("checkpoint")  # under budget: the result if a later probe is over
            if verdict.startswith("end"):
                ended_at_budget = True
                if verdict == "end-checkpoint":
                    last_under = run.checkpoint(False, {"train/loss": window.read(state.step, batch)["train/loss"]})
                break
            if ending.reached(measured):
                break
        if state.step < total_steps and "grid" in due:
            run.draw_grid()
        if state.step < total_steps and "checkpoint" in due:
            last_under = run.checkpoint(False, {"train/loss": window.read(state.step, batch)["train/loss"]})
    seconds = time.perf_counter() - t_start
    if not ended_at_budget:
        ending.finish(run.seen)
    final_loss = window.read(state.step, batch)["train/loss"]
    if ended_at_budget and budget.last_under:
        return TrainResult(checkpoint=last_under, step=state.step, images_seen=run.seen, loss=final_loss,  # the result: the last checkpoint
                           parameters=count_parameters(engine.unwrap(state.model)), seconds=seconds,  # under budget, as written
                           images_per_s=(run.seen - state.start_images) / max(seconds, 1e-9), stopped_at=budget.over_at)
    run.draw_grid()
    spread = {"dist/param_spread": _param_spread(engine, state.model)} if engine.world_size > 1 else {}  # one worker: 0 by definition
    path = run.checkpoint(True, {"train/loss": final_loss, **spread})
    return TrainResult(
        checkpoint=path, step=state.step, images_seen=run.seen, loss=final_loss,
        parameters=count_parameters(engine.unwrap(state.model)), seconds=seconds,
        images_per_s=(run.seen - state.start_images) / max(seconds, 1e-9), ended_by=ending.ended_by,
    )


def _objective_metrics(objective: Objective, engine: Engine) -> dict[str, float]:
    """What an objective measures besides its loss since the last log (fine-tuning's reward and
    path KL), averaged over the ranks: its optional ``read_metrics()`` -> {name: device tensor}."""
    read = getattr(objective, "read_metrics", None)
    return {name: engine.mean(value).item() for name, value in read().items()} if read is not None else {}


def _param_spread(engine: Engine, model: nn.Module) -> float:
    """Largest difference of a parameter checksum between any rank and rank 0: 0 when DDP keeps
    the replicas identical, as it must."""
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in engine.unwrap(model).parameters()]).sum()
    sums = engine.gather(checksum.reshape(1).to(engine.device)).flatten()
    return (sums - sums[0]).abs().max().item()

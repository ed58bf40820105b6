"""The training loop: one function that runs as a single process here and, unchanged, inside
every Ray Train worker (genmem.distributed supplies an Accelerate engine and a Ray reporter).

Budget in images seen (training sets change size across generations), EMA as a half-life in
images, linear warm-up (Karras et al. 2022). Every random draw is derived from (seed, step): the
global batch's data positions (a seeded permutation per epoch) and its noise (x0, t) are drawn
for the whole global batch and each rank takes its slice, so a run is the same function of the
seed whatever the worker count, and resuming at a step needs no saved RNG state.
"""

from __future__ import annotations

import copy
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

from genmem.checkpoint import Checkpoint, save_checkpoint
from genmem.config import TrainConfig
from genmem.data import ArrayDataset
from genmem.errors import TrainingError
from genmem.generative import build_process, derive_seed, generate
from genmem.models import build_model, count_parameters
from genmem.viz import sample_picture, save_png

_DATA_STREAM, _NOISE_STREAM, _TORCH_STREAM, _INIT_STREAM, _GRID_SEED = 1, 2, 3, 4, 20_240_101


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


class Reporter(Protocol):
    """Side effects of training, called on every rank (ranks > 0 usually ignore them)."""

    checkpoint_meta: dict[str, Any]  # extra fields for meta.json (e.g. the MLflow run id)

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None: ...

    def picture(self, step: int, images_seen: int, name: str, picture: np.ndarray) -> None: ...

    def checkpoint_path(self, images_seen: int, final: bool) -> Path: ...

    def checkpoint(self, step: int, images_seen: int, metrics: dict[str, float], path: Path | None, final: bool) -> None: ...


class LocalReporter:
    """Training side effects for a single local process: a progress bar, grid PNGs and the
    checkpoint folder (periodic checkpoints overwrite it; the last one stays)."""

    def __init__(self, output: Path, total_images: int, start_images: int = 0, quiet: bool = False):
        self.output = output
        self.checkpoint_meta: dict[str, Any] = {}
        self.grids: list[Path] = []
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


@dataclass
class TrainResult:
    checkpoint: Path | None
    step: int
    images_seen: int
    loss: float
    parameters: int
    seconds: float
    images_per_s: float

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
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _DATA_STREAM, epoch)))


def global_positions(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """Dataset rows of the global batch at ``step``: epoch e visits a permutation seeded by (seed, e)."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    rows = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = _epoch_permutation(n, seed, e)
        mask = epochs == e
        rows[mask] = perm[offsets[mask]]
    return rows


def global_noise(shape: tuple[int, ...], step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, t) for the whole global batch at ``step``."""
    g = torch.Generator().manual_seed(derive_seed(seed, _NOISE_STREAM, step))
    return torch.randn((batch, *shape), generator=g), torch.rand(batch, generator=g)


def ema_beta(batch: int, halflife_images: int) -> float:
    """Per-step EMA decay so that the weight of an image halves after ``halflife_images`` more."""
    return 0.5 ** (batch / halflife_images)


def _chunks(total: int, every: int) -> Iterator[int]:
    return iter(range(every, total + every, every)) if every else iter(())


def train_loop(
    cfg: TrainConfig,
    train: ArrayDataset,
    reporter: Reporter,
    *,
    engine: Engine | None = None,
    resume: Checkpoint | None = None,
    init: Checkpoint | None = None,
    probe: Callable[[nn.Module, torch.device], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` with ``cfg.process`` on ``train`` for ``cfg.images`` images.

    ``resume``: a checkpoint loaded with ``use_ema=False, with_optimizer=True``; training goes on
    from its step with its weights, EMA and optimizer state. ``init``: a checkpoint loaded with
    ``use_ema=False`` whose weights and EMA start a fresh run (fine-tuning; ignored when resuming).
    ``probe(model, device)``: metrics of
    the sampling model every ``cfg.eval_every_images`` (rank 0), e.g. the memorised fraction.
    """
    engine = engine or Engine()
    shape = tuple(train.shape)
    batch, world = cfg.batch_size, engine.world_size
    local = batch // world
    total_steps = math.ceil(cfg.images / batch)
    process = build_process(cfg.process)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, _INIT_STREAM))  # same initial weights on every rank
        model = build_model(cfg.model, shape)
    step = 0
    start = resume if resume is not None else init
    if start is not None:
        model.load_state_dict(start.model.state_dict())  # raw weights: load with use_ema=False
    if resume is not None:
        step = int(resume.meta["step"])
    ema = None
    if cfg.ema_halflife_images > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if start is not None and start.ema_state is not None:
            ema.load_state_dict(start.ema_state)
    # On the device before the optimizer exists: load_state_dict places the resumed moments
    # beside their parameters, which must already be where training runs.
    model.to(engine.device)
    if ema is not None:
        ema.to(engine.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    if resume is not None and resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    model, optimizer = engine.prepare(model, optimizer)
    beta = ema_beta(batch, cfg.ema_halflife_images) if ema is not None else 0.0

    x_all = train.x.to(engine.device)
    n = len(train)
    data_hash = train.manifest.sha256
    log_marks = _chunks(cfg.images, cfg.log_every_images)
    grid_marks = _chunks(cfg.images, cfg.grid_every_images)
    ckpt_marks = _chunks(cfg.images, cfg.checkpoint_every_images)
    eval_marks = _chunks(cfg.images, cfg.eval_every_images if probe is not None else 0)
    next_log, next_grid, next_ckpt, next_eval = (_advance(m, step * batch) for m in (log_marks, grid_marks, ckpt_marks, eval_marks))

    def sample_model() -> nn.Module:
        return ema if ema is not None else engine.unwrap(model)

    def write_checkpoint(final: bool, metrics: dict[str, float]) -> Path | None:
        path = None
        if engine.is_main:
            path = save_checkpoint(
                reporter.checkpoint_path(step * batch, final),
                engine.unwrap(model),
                cfg,
                shape=shape,
                step=step,
                images_seen=step * batch,
                data_manifest=data_hash,
                ema=ema,
                optimizer=optimizer,
                extra=reporter.checkpoint_meta,
            )
            if final and grid:
                save_png(grid[-1], path / "samples.png")  # the checkpoint shows what it generates
        reporter.checkpoint(step, step * batch, metrics, path, final)
        return path

    grid: list[np.ndarray] = []

    def draw_grid() -> None:
        if engine.is_main:
            x = generate(sample_model(), process, cfg.sampler, shape, range(cfg.grid_size), _GRID_SEED, device=engine.device)
            grid[:] = [sample_picture(x, train.x[:2000], f"{step * batch} images")]
            reporter.picture(step, step * batch, "samples", grid[0])
            model.train()  # generate() switched the (possibly shared) network to eval mode

    lo, hi = engine.rank * local, (engine.rank + 1) * local
    loss_sum, loss_count, last_loss = 0.0, 0, float("nan")
    t_window, imgs_window, t_start = time.perf_counter(), 0, time.perf_counter()
    model.train()
    while step < total_steps:
        torch.manual_seed(derive_seed(cfg.seed, _TORCH_STREAM, step, engine.rank))  # dropout
        rows = global_positions(n, step, batch, cfg.seed)[lo:hi].to(engine.device)
        x0, t = global_noise(shape, step, batch, cfg.seed)
        x1 = x_all[rows]
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * (min(1.0, (step + 1) * batch / cfg.optim.warmup_images) if cfg.optim.warmup_images else 1.0)
        with engine.autocast():
            per_sample = process.loss(model, x1, x0[lo:hi].to(engine.device), t[lo:hi].to(engine.device))
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        engine.backward(loss)
        if cfg.optim.grad_clip is not None:
            engine.clip_grad_norm(model, cfg.optim.grad_clip)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), engine.unwrap(model).parameters()):
                    pe.lerp_(pm.detach(), 1.0 - beta)
        step += 1
        last_loss = engine.mean(loss.detach().float()).item()
        if not math.isfinite(last_loss):
            raise TrainingError(
                f"the training loss became {last_loss} at step {step} ({step * batch} images seen): "
                "lower optim.lr or set optim.grad_clip"
            )
        loss_sum, loss_count, imgs_window = loss_sum + last_loss, loss_count + 1, imgs_window + batch
        seen = step * batch
        if next_log is not None and seen >= next_log:
            now = time.perf_counter()
            reporter.log(step, seen, {
                "train/loss": loss_sum / loss_count,
                "train/images_per_s": imgs_window / max(now - t_window, 1e-9),
                "train/lr": optimizer.param_groups[0]["lr"],
            })
            loss_sum, loss_count, imgs_window, t_window = 0.0, 0, 0, now
            next_log = _advance(log_marks, seen)
        if next_eval is not None and seen >= next_eval:
            if engine.is_main:
                reporter.log(step, seen, probe(sample_model(), engine.device))
                model.train()
            next_eval = _advance(eval_marks, seen)
        if next_grid is not None and seen >= next_grid and step < total_steps:
            draw_grid()
            next_grid = _advance(grid_marks, seen)
        if next_ckpt is not None and seen >= next_ckpt and step < total_steps:
            write_checkpoint(False, {"train/loss": last_loss})
            next_ckpt = _advance(ckpt_marks, seen)

    seconds = time.perf_counter() - t_start
    draw_grid()
    path = write_checkpoint(True, {"train/loss": last_loss, "dist/param_spread": _param_spread(engine, model)})
    done = step * batch - (int(resume.meta["images_seen"]) if resume is not None else 0)
    return TrainResult(
        checkpoint=path,
        step=step,
        images_seen=step * batch,
        loss=last_loss,
        parameters=count_parameters(engine.unwrap(model)),
        seconds=seconds,
        images_per_s=done / max(seconds, 1e-9),
    )


def _param_spread(engine: Engine, model: nn.Module) -> float:
    """Largest difference of a parameter checksum between any rank and rank 0: 0 when DDP keeps
    the replicas identical, as it must."""
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in engine.unwrap(model).parameters()]).sum()
    sums = engine.gather(checksum.reshape(1).to(engine.device)).flatten()
    return (sums - sums[0]).abs().max().item()


def _advance(marks: Iterator[int], seen: int) -> int | None:
    """The first mark beyond ``seen`` images."""
    for m in marks:
        if m > seen:
            return m
    return None


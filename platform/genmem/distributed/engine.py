"""The Accelerate engine: the training loop's device and peer operations inside a Ray Train
worker. One process on a laptop, DDP over Ray's process group on N workers, bf16 on GPU."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from genmem.errors import ConfigError
from genmem.training import Engine


class AccelerateEngine(Engine):
    def __init__(self, mixed_precision: str = "no"):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # AcceleratorState is a per-process singleton; a Ray worker process can be reused by a
        # later run with other settings, so start from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        # Without CUDA, Accelerator() silently runs one process per worker (no DDP): cpu=True
        # makes it join the gloo group Ray Train has already set up (DESIGN.md, measured facts).
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("scaling.mixed_precision=fp16 is a no-op on CPU: use bf16 or no")
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
        self.mixed_precision = mixed_precision
        self.rank = self.acc.process_index
        self.world_size = self.acc.num_processes
        self.device = self.acc.device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.world_size == 1 and self.mixed_precision != "fp16":
            # Ray Train sets LOCAL_RANK, so Accelerate would wrap even one worker in DDP: 3-4% of
            # the step for nothing (measured on the bench's U-Net). Autocast stays explicit; fp16
            # needs the prepared optimizer to unscale its gradients.
            return model.to(self.device), optimizer
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.acc.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def autocast(self) -> AbstractContextManager:
        return self.acc.autocast()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> None:
        self.acc.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(value, reduction="mean") if self.world_size > 1 else value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(value[None]) if self.world_size > 1 else value[None]

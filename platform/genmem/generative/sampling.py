"""Seeded generation: sample k depends only on (seed, k), whatever the batch size or worker.

Each sample draws its starting noise (and, for the SDE, its Brownian increments) from its own
``torch.Generator`` seeded from (seed, k), as in EDM's per-image seeds (Karras et al. 2022).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from genmem.config import SamplerConfig
from genmem.generative.diffusion import VPDiffusion
from genmem.generative.process import Process
from genmem.generative.solvers import odesolve, sdesolve


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, well mixed (numpy SeedSequence), stable across runs."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, k)) for k in indices]


def _draw(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def time_grid(process: Process, steps: int) -> torch.Tensor:
    return torch.linspace(process.t_start, process.t_end, steps + 1, dtype=torch.float64)


@torch.no_grad()
def generate(
    model: nn.Module,
    process: Process,
    sampler: SamplerConfig,
    shape: tuple[int, ...],
    indices: range | list[int],
    seed: int,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Samples for the given indices, shape (len(indices), *shape), on the CPU.

    A network is sampled in eval mode; each of its modules gets its own ``training`` flag back
    when this returns (or raises), so sampling inside a training loop leaves it training.

    >>> x = generate(model, FlowMatching(), SamplerConfig(method="heun", steps=32), (2,), range(1000), seed=0)
    """
    # Restore each module's own flag, not model.train(): a network may keep some parts in eval.
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        indices = list(indices)
        grid = time_grid(process, sampler.steps)
        out = []
        for start in range(0, len(indices), batch_size):
            gens = sample_generators(seed, indices[start : start + batch_size])
            x = _draw(gens, shape).to(device)
            if sampler.method == "sde":
                if not isinstance(process, VPDiffusion):
                    raise ValueError("sampler.method=sde needs process.kind=diffusion")
                drift, g = process.sde_drift_diffusion(model)
                x = sdesolve(drift, g, x, grid, lambda i, gens=gens: _draw(gens, shape).to(device))
            else:
                x = odesolve(process.velocity(model), x, grid, sampler.method, rtol=sampler.rtol, atol=sampler.atol)
            out.append(x.float().cpu())
        return torch.cat(out) if out else torch.empty(0, *shape)
    finally:
        for module, training in modes:
            module.training = training

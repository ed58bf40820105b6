"""ODE and SDE solvers over a time grid. A solver holds no training state: it takes a velocity
callable ``v(x, t)`` (t of shape (batch,)) and returns the state at the end of the grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FIXED_STEP = ("euler", "heun", "rk4")


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).expand(x.shape[0])


def _step(method: str, v: Velocity, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    h = t1 - t0
    if method == "euler":
        return x + h * v(x, _tvec(t0, x))
    if method == "heun":  # explicit trapezoid (Karras et al. 2022, Alg. 1 without churn)
        k1 = v(x, _tvec(t0, x))
        k2 = v(x + h * k1, _tvec(t1, x))
        return x + 0.5 * h * (k1 + k2)
    if method == "rk4":
        tm = t0 + 0.5 * h
        k1 = v(x, _tvec(t0, x))
        k2 = v(x + 0.5 * h * k1, _tvec(tm, x))
        k3 = v(x + 0.5 * h * k2, _tvec(tm, x))
        k4 = v(x + h * k3, _tvec(t1, x))
        return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown fixed-step solver '{method}': choose one of {', '.join(FIXED_STEP)}")


def odesolve(
    v: Velocity,
    x: torch.Tensor,
    grid: torch.Tensor | Sequence[float],
    method: str = "heun",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    enable_grad: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) over ``grid`` and return x at its last time.

    Fixed-step methods take one step per grid interval; ``dopri5`` is adaptive (torchdiffeq) and
    uses only the grid's end points, to ``rtol``/``atol``.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    with torch.set_grad_enabled(enable_grad):
        if method == "dopri5":
            from torchdiffeq import odeint

            ts = torch.stack([grid[0], grid[-1]]).to(x.device)  # float64 time: small steps near t = 1
            return odeint(lambda t, y: v(y, _tvec(t, y)), x, ts, method="dopri5", rtol=rtol, atol=atol)[-1]
        grid = grid.to(x.device)
        for t0, t1 in zip(grid[:-1], grid[1:]):
            x = _step(method, v, x, t0.to(x.dtype), t1.to(x.dtype))
        return x


def sdesolve(
    drift: Velocity,
    g: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: torch.Tensor | Sequence[float],
    noise: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Euler–Maruyama for dx = drift(x, t) dt + g(t) dW over ``grid``.

    ``noise(i)`` returns the standard normal increment for step i, shaped like x: the caller draws
    it from per-sample generators so sample k is the same whatever the batch it is in. The last
    step is taken without noise (Song et al. 2021: the final denoising step).
    """
    grid = torch.as_tensor(grid, dtype=torch.float64).to(x.device)
    n = len(grid) - 1
    with torch.no_grad():
        for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
            h = (t1 - t0).to(x.dtype)
            tv = _tvec(t0.to(x.dtype), x)
            x = x + h * drift(x, tv)
            if i < n - 1:
                x = x + (g(tv) * h.sqrt()).view(-1, *([1] * (x.dim() - 1))) * noise(i)
    return x

"""The Riemannian exponential map of G(θ) = I + g gᵀ, g = ∇L(θ) (METHODS.md §Riemannian Laplace, step 4).

G is the metric the graph {(θ, L(θ))} inherits from the ambient Euclidean space; its geodesics are

    θ'' = − g (θ'ᵀ ∇²L(θ) θ') / (1 + ||g||²),   θ(0) = θ0, θ'(0) = v,

integrated from s = 0 to 1 with the state (θ, θ') as one vector. Each right-hand side costs one
gradient and one Hessian-vector product of ``obj`` — any object with ``grad(θ)`` and ``hvp(θ, v)``
(and optionally a joint ``grad_and_hvp``), so explicit surfaces can be tested. The ODE is stiff
near a sharp minimum (METHODS.md: 20 RK4 steps diverged), hence adaptive dopri5 by default.

>>> res = exponential_map(obj, obj.theta_star, v, solver="dopri5", rtol=1e-4, atol=1e-6)
>>> res.theta, res.n_rhs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from genmem.errors import SolverError

SOLVERS = ("dopri5", "bosh3", "rk4")
SECOND_DERIVATIVES = ("hvp", "fd")  # θ'ᵀ∇²L θ' by a Hessian-vector product, or by a forward difference of gradients  # adaptive 5(4) and 3(2) Runge–Kutta (torchdiffeq), fixed-step RK4


class GeodesicError(SolverError):
    """The geodesic solve failed (non-finite state, step-size underflow or too many evaluations)."""


@dataclass
class GeodesicResult:
    theta: torch.Tensor  # endpoint θ(1)
    velocity: torch.Tensor  # θ'(1)
    path: torch.Tensor  # states (θ, θ') at ``grid``, shape (len(grid), 2P)
    grid: torch.Tensor
    n_rhs: int  # right-hand sides evaluated = gradients = HVPs


class _Stop(Exception):
    pass


def exponential_map(
    obj,
    theta0: torch.Tensor,
    v: torch.Tensor,
    *,
    solver: str = "dopri5",
    steps: int = 20,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    max_evals: int = 5000,
    grid: torch.Tensor | None = None,
    second_derivative: str = "hvp",
) -> GeodesicResult:
    """Exp_θ0(v): the geodesic's endpoint at s = 1, and its states at ``grid``.

    ``second_derivative="fd"`` replaces the HVP by a forward difference of gradients,
    θ'ᵀ∇²L θ' ≈ θ'ᵀ(∇L(θ + εθ') − ∇L(θ))/ε with ε = √eps · (1 + ||θ||)/||θ'||: two gradients per
    right-hand side instead of a gradient and an HVP (relative error about √eps, far below the
    solver's tolerance).

    ``grid`` defaults to linspace(0, 1, steps + 1) for RK4 (one RK4 step per interval) and
    [0, 1] for the adaptive solvers. Raises ``GeodesicError`` naming the s (and step) reached on failure.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if second_derivative not in SECOND_DERIVATIVES:
        raise ValueError(f"second_derivative {second_derivative!r} is not one of {', '.join(SECOND_DERIVATIVES)}")
    if grid is None:
        grid = torch.linspace(0.0, 1.0, steps + 1) if solver == "rk4" else torch.tensor([0.0, 1.0])
    grid = grid.to(theta0.dtype)
    p = theta0.numel()
    count, reached = [0], [0.0]

    def rhs(s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if count[0] >= max_evals:
            raise _Stop(f"more than max_evals = {max_evals} right-hand sides")
        if not torch.isfinite(state).all():
            raise _Stop("non-finite state")
        count[0] += 1
        reached[0] = float(s)
        theta, u = state[:p], state[p:]
        return torch.cat([u, -_bend(obj, theta, u, second_derivative)])

    def fail(reason: str, where: str) -> GeodesicError:
        return GeodesicError(
            f"geodesic {solver} solve failed at {where} after {count[0]} gradient+HVP evaluations ({reason}): "
            "lower the scale, raise the tolerances or max_evals, or use solver='dopri5'"
        )

    y0 = torch.cat([theta0, v.to(theta0.dtype)])
    if solver == "rk4":
        path = _rk4_path(rhs, y0, grid, fail)
    else:
        try:
            path = odeint(rhs, y0, grid, method=solver, rtol=rtol, atol=atol)
        except (_Stop, AssertionError) as err:  # torchdiffeq asserts on dt underflow / non-finite y
            raise fail(str(err).split(":")[0], f"s = {reached[0]:.3g}") from None
        if not torch.isfinite(path).all():
            raise fail("non-finite state", "s = 1")
    return GeodesicResult(theta=path[-1, :p], velocity=path[-1, p:], path=path, grid=grid, n_rhs=count[0])


def _bend(obj, theta: torch.Tensor, u: torch.Tensor, second_derivative: str) -> torch.Tensor:
    """g (uᵀ∇²L u) / (1 + ||g||²): minus the acceleration of the geodesic equation (module docstring)."""
    if second_derivative == "fd":
        g, speed = obj.grad(theta), float(u.norm())
        if speed == 0.0:
            return torch.zeros_like(g)
        eps = torch.finfo(theta.dtype).eps ** 0.5 * (1.0 + float(theta.norm())) / speed
        uhu = u.dot(obj.grad(theta + eps * u) - g) / eps
    elif hasattr(obj, "grad_and_hvp"):
        g, hu = obj.grad_and_hvp(theta, u)
        uhu = u.dot(hu)
    else:
        g, uhu = obj.grad(theta), u.dot(obj.hvp(theta, u))
    return g * (uhu / (1.0 + g.dot(g)))


def _rk4_path(rhs, y0: torch.Tensor, grid: torch.Tensor, fail) -> torch.Tensor:
    """Classic RK4, one step per interval of ``grid``; the states at every grid point."""
    states = [y0]
    for k in range(len(grid) - 1):
        s, h, y = grid[k], grid[k + 1] - grid[k], states[-1]
        try:
            k1 = rhs(s, y)
            k2 = rhs(s + h / 2, y + h / 2 * k1)
            k3 = rhs(s + h / 2, y + h / 2 * k2)
            k4 = rhs(s + h, y + h * k3)
        except _Stop as err:
            raise fail(str(err), f"step {k + 1} of {len(grid) - 1} (s = {float(s):.3g})") from None
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if not torch.isfinite(y).all():
            raise fail("non-finite state", f"step {k + 1} of {len(grid) - 1} (s = {float(s + h):.3g})")
        states.append(y)
    return torch.stack(states)

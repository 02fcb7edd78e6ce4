"""Flow matching on the straight path between noise and data.

Convention (the flow_matching library's; diffusers/SD3 run the other way): t in [0, 1], t = 0 is
pure noise, t = 1 is data.

    x_t = (1 - t) * noise + t * x1        target velocity  v = dx_t/dt = x1 - noise

Sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 with torchdiffeq.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from jaxtyping import Float
from torch import Tensor
from torchdiffeq import odeint

from .debug import typechecked

# torchdiffeq's fixed-grid solvers (they take the steps given) and, for the Runge-Kutta ones,
# their function evaluations per step; every other method chooses its own steps
FIXED_GRID_METHODS = ('euler', 'midpoint', 'heun2', 'heun3', 'rk4', 'explicit_adams', 'implicit_adams', 'fixed_adams')
EVALUATIONS_PER_STEP = {'euler': 1, 'midpoint': 2, 'heun2': 2, 'heun3': 3, 'rk4': 4}
# torchdiffeq's adaptive methods (torchdiffeq 0.2.5): they choose their steps from rtol and atol
ADAPTIVE_METHODS = ('dopri8', 'dopri5', 'bosh3', 'fehlberg2', 'adaptive_heun', 'scipy_solver')


def check_method(method: str) -> None:
    """Refuse an ODE method torchdiffeq does not have before sampling starts (torchdiffeq itself
    would only refuse it at the first modality)."""
    if not isinstance(method, str) or method not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
        raise ValueError(f'ode_method must be one of torchdiffeq\'s methods {FIXED_GRID_METHODS + ADAPTIVE_METHODS}, got {method!r}')


def sample_times(count: int, method: str, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Float['i'] training times in [0, 1]: 'uniform', or 'logit_normal' (sigmoid of a standard
    normal, Esser et al. 2024), which spends more samples mid-path."""
    if method == 'uniform':
        return torch.rand(count, device = device, generator = generator)
    if method == 'logit_normal':
        return torch.randn(count, device = device, generator = generator).sigmoid()
    raise ValueError(f"time sampling must be 'uniform' or 'logit_normal', got {method!r}")


def limit_noise(times: Tensor, limited: Tensor) -> Tensor:
    """Map the times of `limited` instances (Bool['i']) from [0, 1] into the cleaner half [0.5, 1]."""
    return torch.where(limited, 0.5 + 0.5 * times, times)


@typechecked
def noised(data: Float[Tensor, 'l c'], noise: Float[Tensor, 'l c'], times: Float[Tensor, 'l']) -> Float[Tensor, 'l c']:
    """x_t for data and noise Float['l c'] and per-token times Float['l']."""
    t = times[:, None].to(data.dtype)
    return (1 - t) * noise + t * data


@typechecked
def velocity_target(data: Float[Tensor, '*shape'], noise: Float[Tensor, '*shape']) -> Float[Tensor, '*shape']:
    return data - noise


@typechecked
def integrate(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Float[Tensor, '*shape'],
    steps: int,
    method: str = 'midpoint',
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Float[Tensor, '*shape']:
    """Solve dx/dt = velocity(t, x) from x(0) = noise to t = 1; returns x(1).

    steps: number of equal steps for the fixed-grid solvers (FIXED_GRID_METHODS), so for the
        Runge-Kutta ones `steps * EVALUATIONS_PER_STEP[method]` calls of `velocity`; adaptive
        solvers ('dopri5', ...) choose their own steps from rtol/atol and ignore it.
    """
    if steps < 1:
        raise ValueError(f'modality_steps must be at least 1, got {steps}')
    grid = torch.linspace(0., 1., steps + 1, device = noise.device, dtype = torch.float32)
    if method in FIXED_GRID_METHODS:
        # the steps go in as the solver's grid and only the ends as the output times: torchdiffeq
        # then interpolates and stores x(1) alone, not every step's state (2% of a 64-token CPU
        # modality call, benchmarks/HISTORY.md)
        solver_arguments = dict(options = dict(grid_constructor = lambda func, y0, t: grid.to(t)))
    else:
        solver_arguments = dict(rtol = rtol, atol = atol)
    trajectory = odeint(velocity, noise, grid[[0, -1]], method = method, **solver_arguments)
    return trajectory[-1]


@lru_cache(maxsize = None)
def evaluation_times(steps: int, method: str, dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
    """The times at which `integrate(velocity, noise, steps, method)` on CPU, with noise of
    `dtype`, calls `velocity`: each once, in order of first call, as the values of the t it
    passes. () for the adaptive methods, whose times depend on the velocity. Found by solving
    dx/dt = 0 once per (steps, method, dtype)."""
    if method not in FIXED_GRID_METHODS:
        return ()
    seen: dict[float, None] = {}

    def record(t: Tensor, x: Tensor) -> Tensor:
        seen.setdefault(t.item())
        return torch.zeros_like(x)

    integrate(record, torch.zeros(1, dtype = dtype), steps, method)
    return tuple(seen)

"""Consistency flow matching: a velocity-consistency loss against an EMA model.

Yang et al. 2024, "Consistency Flow Matching: Defining Straight Flows with Velocity Consistency"
(arXiv 2407.02398). Their time convention is this library's: t in [0, 1], t = 0 noise, t = 1 data.

Definitions (the paper's single-segment form):
- the straight path from noise x0 to data x1: x_t = (1 - t) * x0 + t * x1;
- the endpoint the predicted velocity v points to when followed in a straight line from (t, x):
  f(t, x) = x + (1 - t) * v(t, x);
- the velocity consistency loss, for a time t and the neighbouring time t + delta on the SAME path
  (the same x0 and x1), with theta the trained weights and theta- an exponential moving average
  of them, used without gradient:

      || f_theta(t, x_t) - f_theta-(t + delta, x_{t+delta}) ||^2
          + alpha * || v_theta(t, x_t) - v_theta-(t + delta, x_{t+delta}) ||^2

It vanishes when the predicted velocity is constant along each straight path (so f is the same
point all along it) and the EMA agrees: the flows are straight and few ODE steps suffice.

Not implemented: the paper's multi-segment variant (K segments of [0, 1], f pointing to the end
of the current segment). Defaults delta = 1e-3 and alpha = 1e-5 are the values of the authors'
CIFAR-10 configuration in their code release.

Both evaluations go through the public `Transfusion.predict` (its gradient-carrying form
`predict.__wrapped__`), so they see the same packed batch, noise and conditioning, and run as
predict does: dropout and conditioning dropout off, so the two differ only in weights and time.

Glossary: i modality instances, l latent tokens of one modality, c its dim_latent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import objective
from .checkpoint import config_differences
from .constants import at_least_fp32
from .debug import Batch
from .modes import eval_mode
from .sampling_options import is_real_number


def consistency_flow_loss(model: nn.Module, ema_model: nn.Module, batch: Batch, *, delta: float = 1e-3, alpha: float = 1e-5,
                          modality_type: int | None = None, times: Tensor | None = None,
                          noise: Sequence[Tensor] | None = None) -> Tensor:
    """Scalar Float[''] velocity-consistency loss of `model` against `ema_model` on `batch`.

    Use it beside the flow-matching loss, and update the EMA after each optimizer step:

        ema = make_ema(model)                                # transfusion_pytorch.checkpoint
        loss = model(batch) + weight * consistency_flow_loss(model, ema, batch)
        loss.backward(); optimizer.step(); ema.update_parameters(model)

    model: the Transfusion being trained (the unwrapped module; its gradients flow). Under
        FSDP2, call this after `model(batch)` in the same step: only the root module's forward
        gathers the root's own parameters, and this goes past it.
    ema_model: its EMA, `make_ema(model)` (a torch.optim.swa_utils.AveragedModel; the average is
        `.module`), or any Transfusion of the same configuration. Evaluated under no_grad.
        Passing `model` itself gives the stop-gradient form without an EMA.
    batch: as for `model(batch)`: a list of samples or a floating (b, ...) tensor of one
        modality (`modality_type`, default 0). Text is context only; a batch without modality
        instances gives zero.
    delta: the time step between the two evaluations, in (0, 1).
    alpha: weight of the velocity term.
    times: Float['i'] the model's times, one per instance, in [0, 1 - delta]; drawn uniformly
        there by default. The EMA is evaluated at times + delta.
    noise: one tensor per instance in the latent layout (as for `model(batch, noise=...)`),
        shared by both evaluations; Gaussian by default.
    Returns the mean over latent elements per modality, averaged over the modalities present
    with their loss weights (as the flow loss is).
    """
    _check_weights(delta, alpha)
    ema = ema_model.module if isinstance(ema_model, torch.optim.swa_utils.AveragedModel) else ema_model
    _check_same_architecture(model, ema)
    zero = model.token_embedding.weight.new_zeros((), dtype = torch.float32)
    if torch.is_tensor(batch) and not (batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool):
        return zero                                                 # text-only: nothing to flow
    # the checks of times and noise need the packed batch; a trainable encoder's state is kept if they fail
    with model.modalities.encoder_state_kept_on_error(), eval_mode(model):   # encoders run as in predict
        packed = model.pack(model._as_samples(batch, modality_type))   # encoded once, for both predictions
        if packed.num_instances == 0:
            return zero
        times = _checked_times(times, packed.num_instances, delta, model.device)
        if noise is not None:
            objective.noise_by_group(model, packed, noise)          # raises before anything is drawn
    if times is None:
        times = torch.rand(packed.num_instances, device = model.device) * (1 - delta)
    if noise is None:
        noise = [_gaussian(model, m, shape) for m, shape in zip(packed.instance_modality, packed.instance_shape)]
    student = _endpoints_and_velocities(model.predict_packed(packed, times, noise))
    with torch.no_grad():
        # float32 rounding of times + delta may pass 1 by an ulp; the time is 1 there
        teacher = _endpoints_and_velocities(ema.predict_packed(packed, (times + delta).clamp(max = 1), noise))
    parts = {}
    for m in sorted(set(packed.instance_modality)):
        mine = [i for i, modality in enumerate(packed.instance_modality) if modality == m]
        gather = lambda pairs, k: torch.cat([pairs[i][k].flatten() for i in mine])
        parts[m] = F.mse_loss(gather(student, 0), gather(teacher, 0)) + alpha * F.mse_loss(gather(student, 1), gather(teacher, 1))
    weights = {m: model.config.modalities[m].loss_weight for m in parts}
    return sum(weights[m] * part for m, part in parts.items()) / sum(weights.values())


def _check_weights(delta, alpha) -> None:
    for name, value in (('delta', delta), ('alpha', alpha)):
        if not is_real_number(value):
            raise TypeError(f'{name} must be a number, got {type(value).__name__}')
    if not 0 < delta < 1:
        raise ValueError(f'delta must be in (0, 1), got {delta}')
    if not 0 <= alpha < math.inf:
        raise ValueError(f'alpha (the weight of the velocity term) must be finite and >= 0, got {alpha}')


def _check_same_architecture(model: nn.Module, ema: nn.Module) -> None:
    """The EMA must be the same model up to options that do not change the weights: another
    shape would give a loss against a different network, or fail deep inside with a noise error."""
    if not hasattr(ema, 'config') or not hasattr(ema, 'predict_packed'):
        raise TypeError(f'ema_model must be make_ema(model) or a Transfusion, got {type(ema).__name__} (pass modules unwrapped from DDP)')
    # equal configs (the usual case, every step) skip the field-by-field comparison: 6 against ~350 us
    if ema.config != model.config and (differences := config_differences(ema.config, model.config, ('ema', 'model'))):
        raise ValueError('ema_model must be an EMA of model (make_ema(model)) or a Transfusion of the same configuration '
                         '(runtime options such as compile_blocks aside); they differ in ' + '; '.join(differences))


def _checked_times(times, count: int, delta: float, device: torch.device) -> Tensor | None:
    """The caller's times, checked as `model(batch, times=...)` checks them, and at most
    1 - delta so that the EMA's times + delta stay in [0, 1]; None stays None."""
    if times is None:
        return None
    times = objective.checked_times(times, count, device)
    if not bool((times <= 1 - delta).all()):
        raise ValueError(f'times must lie in [0, 1 - delta = {1 - delta:g}] so that times + delta stays in [0, 1]')
    return times


def _gaussian(model, modality: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise for one instance, in the user's latent layout."""
    latent = torch.randn(*shape, model.config.modalities[modality].dim_latent, device = model.device)
    return model.to_user_layout(modality, latent)


def _endpoints_and_velocities(prediction) -> list[tuple[Tensor, Tensor]]:
    """Per instance (f, v) in at least fp32, f = x_t + (1 - t) v, from a `Prediction`."""
    out = []
    for x, v, t in zip(prediction.noised, prediction.velocities, prediction.times):
        v = at_least_fp32(v)
        out.append((at_least_fp32(x) + (1 - t) * v, v))
    return out

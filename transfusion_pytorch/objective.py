"""The training objective: the draws of a step (times, noise, conditioning dropout), the noised
inputs, and the loss

    loss = text_loss_weight * CE + flow_loss_weight * flow MSE

where CE is the mean over every predicted discrete token and the flow MSE is, per modality, the
mean over its latent elements (so its scale does not grow with dim_latent or the number of
tokens), averaged over the modalities present with their loss weights.

Glossary: b batch, n tokens, i instances, L latent rows of a modality, c dim_latent.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import flow
from .batch import PackedBatch
from .constants import at_least_fp32
from .transfer import EarlyFlag, host_to_device


@dataclass
class LossBreakdown:
    """The parts of the loss: total = text_loss_weight * text + flow_loss_weight * flow, where
    flow is the loss-weighted mean of the per-modality flow MSEs present in the batch."""
    total: Tensor
    text: Tensor
    flow: Tensor
    flow_per_modality: dict[int, Tensor]


def text_only_loss(model, ids: Tensor) -> LossBreakdown:
    """Causal LM loss of text-only rows Int['b n'] (one host sync for validation, after the
    forward is queued when the ids live on an accelerator)."""
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f'text-only training expects token ids of shape (b, n) with b >= 1 and n >= 2, got {tuple(ids.shape)}')
    if ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f'text-only training expects integer token ids, got {ids.dtype}')
    ids = ids.long()              # range checks on uint8 / int16 ids would wrap (and uint16 has no `<`)
    limit = model.config.num_text_tokens
    invalid = EarlyFlag(((ids < 0) | (ids >= limit)).any())
    if ids.device.type == 'cpu':
        _raise_for_text_ids(model, ids, invalid)
    ids = (ids if ids.device == model.device else host_to_device(ids, model.device)).long()
    logits = model.text_logits(ids.clamp(0, limit - 1))[:, :-1]   # clamped: no device assert before the check
    text = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), ids[:, 1:].flatten())
    _raise_for_text_ids(model, ids, invalid)                       # device batches: after queueing, waits for the flag only
    total = model.config.text_loss_weight * text + unused_parameter_anchor(model, set())
    return LossBreakdown(total = total, text = text, flow = text.new_zeros(()), flow_per_modality = {})


def _raise_for_text_ids(model, ids: Tensor, invalid: EarlyFlag) -> None:
    if invalid.value():
        row, column = ((ids < 0) | (ids >= model.config.num_text_tokens)).nonzero()[0].tolist()
        raise ValueError(f'sample {row}, item 0: text id {int(ids[row, column])} at position {column} is outside [0, num_text_tokens={model.config.num_text_tokens})')


def draw(model, packed: PackedBatch, times: Tensor | None, noise: Sequence[Tensor] | None):
    """Times Float['i'], per-group noise Float['l c'] and isolated tokens Bool['n'] | None.
    Caller-given times and noise are checked before anything is drawn, so a rejected call
    leaves the random number generators as they were."""
    count, device = packed.num_instances, model.device
    if times is not None:
        times = checked_times(times, count, device)
    group_noise = noise_by_group(model, packed, noise) if noise is not None else None
    if times is None:
        times = flow.sample_times(count, model.config.time_sampling, device)
        if model.config.noise_limit_before_text and model.training:
            times = flow.limit_noise(times, packed.instance_followed_by_text)
    if group_noise is None:
        group_noise = [torch.randn_like(g.data) for g in packed.groups]
    isolated = None
    if model.config.condition_dropout > 0 and model.training:
        dropped = torch.rand(count, device = device) < model.config.condition_dropout
        dropped = torch.cat((dropped, dropped.new_zeros(1)))                       # index -1 -> False
        isolated = dropped[packed.instance]
    return times, group_noise, isolated


def checked_times(times, count: int, device: torch.device) -> Tensor:
    """Caller-given times -> Float['i'] on `device`: one per instance, finite, in [0, 1] (t = 0
    noise, t = 1 data). A research path: its check may read back from the device."""
    if not torch.is_tensor(times) and not isinstance(times, (list, tuple)):
        raise TypeError(f'times must be a tensor or a list of floats, one per modality instance, got {type(times).__name__}')
    if torch.is_tensor(times) and (times.dtype == torch.bool or times.is_complex()):
        raise TypeError(f'times must be real numbers, got a tensor of {times.dtype}')
    times = torch.as_tensor(times, dtype = torch.float32)
    if times.ndim > 1:
        raise ValueError(f'times must hold one value per modality instance, of shape ({count},), got shape {tuple(times.shape)}')
    times = times.reshape(-1)
    if times.shape[0] != count:
        raise ValueError(f'times must hold one value per modality instance ({count}), got {times.shape[0]}')
    outside = ~((times >= 0) & (times <= 1))                  # NaN is outside too
    if outside.any():
        instance = int(outside.nonzero()[0])
        raise ValueError(f'times must lie in [0, 1] (t = 0 noise, t = 1 data); instance {instance} has {float(times[instance])}')
    return times.to(device)


def noise_by_group(model, packed: PackedBatch, noise: Sequence[Tensor]) -> list[Tensor]:
    """Caller-given noise, one tensor per instance in the latent layout -> per-group Float['L c']."""
    if not isinstance(noise, (list, tuple)):
        raise TypeError(f'noise must be a list of tensors, one per modality instance in order of appearance, got {type(noise).__name__}')
    if len(noise) != packed.num_instances:
        raise ValueError(f'noise must hold one tensor per modality instance ({packed.num_instances}), got {len(noise)}')
    flat = []
    for i, (modality, shape, tensor) in enumerate(zip(packed.instance_modality, packed.instance_shape, noise)):
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            raise TypeError(f'noise for instance {i} must be a floating tensor, got {tensor.dtype if torch.is_tensor(tensor) else type(tensor).__name__}')
        spec = model.config.modalities[modality]
        canonical = tensor.movedim(0, -1) if spec.channel_first else tensor
        if tuple(canonical.shape) != (*shape, spec.dim_latent):
            raise ValueError(f'noise for instance {i} must match its latent shape {(*shape, spec.dim_latent)} (in the latent layout), got {tuple(tensor.shape)}')
        flat.append(canonical.reshape(-1, spec.dim_latent).to(model.device))
    finite = torch.stack([x.isfinite().all() for x in flat]) if flat else None
    if finite is not None and not finite.all():
        raise ValueError(f'noise for instance {int((~finite).nonzero()[0])} holds non-finite values')
    return [torch.cat([flat[i] for i in range(len(flat)) if packed.instance_modality[i] == g.modality]) for g in packed.groups]


def unused_parameter_anchor(model, present: set[int]) -> Tensor:
    """Zero that depends on the parameters this batch did not use (absent modalities, time
    conditioning without instances), so every parameter gets a gradient and DDP needs no
    find_unused_parameters."""
    unused = [p for m, proj in enumerate(model.modalities.projections) if m not in present for p in proj.parameters()]
    # (absent modalities' expert weights are anchored inside the blocks: experts.ExpertLinear)
    if not present:
        for module in (model.modalities.time_embedding, model.modalities.adaptive):
            unused += list(module.parameters()) if module is not None else []
    if model.modalities.train_encoders:
        unused += [p for m in range(model.config.num_modalities) if m not in present for p in model.modalities.encoders[m].parameters()]
    anchor = model.token_embedding.weight.new_zeros(())
    for p in unused:
        if p.requires_grad:
            anchor = anchor + 0. * p.sum()
    return anchor


def packed_loss(model, packed: PackedBatch, times, noise) -> LossBreakdown:
    """Text CE + flow MSE of a packed batch; times and noise are drawn unless given."""
    times, group_noise, isolated = draw(model, packed, times, noise)
    inputs = [flow.noised(g.data, n, times[g.data_instance]) for g, n in zip(packed.groups, group_noise)]
    hidden = model.packed_hidden(packed, inputs, times, isolated)
    logits = model.to_logits(hidden[packed.loss_index])
    text = F.cross_entropy(at_least_fp32(logits), packed.loss_targets)
    flow_parts = {
        g.modality: F.mse_loss(at_least_fp32(model.modalities.velocity_group(g.modality, hidden[g.index], x_t.to(hidden.dtype), g.shapes)),
                               flow.velocity_target(at_least_fp32(g.data), at_least_fp32(n)))
        for g, n, x_t in zip(packed.groups, group_noise, inputs)
    }
    flow_loss = text.new_zeros(())
    if flow_parts:
        weights = {m: model.config.modalities[m].loss_weight for m in flow_parts}
        flow_loss = sum(weights[m] * part for m, part in flow_parts.items()) / sum(weights.values())
    total = model.config.text_loss_weight * text + model.config.flow_loss_weight * flow_loss
    total = total + unused_parameter_anchor(model, set(flow_parts))
    return LossBreakdown(total = total, text = text, flow = flow_loss, flow_per_modality = flow_parts)

"""What the transformer needs from a token layout besides embeddings: rotary positions (1-D or
axial), the attention mask (with N-d ALiBi inside instances), and the expert of every token.

Packed batches (training, prompts, uncached sampling) and the cached decoding steps build these
here, from the same definitions, so the options behave identically on every path:

- axial rotary: text-like tokens (p, p, ..., p); a latent token (o, o + c_1, ..., o + c_A), o the
  instance's first position in its sample, c its grid coordinates, A the config's axes;
- ALiBi: -slope_h * |c_q - c_k| between latent tokens of one instance;
- experts: 0 for text-like tokens, 1 + m for latents of modality m.

Glossary: n tokens, i instances, a grid axes, k position components, h heads, b rows.
"""
from __future__ import annotations

import itertools
import math
from array import array

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import PackedBatch
from .config import TransfusionConfig
from .experts import TEXT_EXPERT, Routing
from .masks import FLEX_BLOCK, AttentionRule, instance_alibi, mask_for_rule, resolve_backend
from .positions import axial_positions, sequence_positions
from .transfer import host_to_device


def grid_coordinates(shape: tuple[int, ...], axes: int, device = None) -> Tensor:
    """Int['prod(shape) axes'] raster-order coordinates, missing axes 0."""
    values = array('q')
    padding = (0,) * (axes - len(shape))
    for point in itertools.product(*(range(a) for a in shape)):
        values.extend(point + padding)
    coords = torch.frombuffer(values, dtype = torch.long).reshape(-1, axes) if values else torch.zeros(1, axes, dtype = torch.long)
    return host_to_device(coords, torch.device(device or 'cpu'))


def coordinate_axes(config: TransfusionConfig, packed: PackedBatch) -> int:
    if config.axial_rotary:
        return config.max_axes
    return max([len(shape) for shape in packed.instance_shape] + [1])


def packed_coordinates(config: TransfusionConfig, packed: PackedBatch) -> Tensor:
    """Int['n a'] grid coordinates of every latent token (0 for text-like tokens)."""
    axes = coordinate_axes(config, packed)
    coords = torch.zeros(packed.length, axes, dtype = torch.long)
    for start, shape, modality in zip(packed.instance_starts, packed.instance_shape, packed.instance_modality):
        token_shape = config.modalities[modality].token_shape(shape)
        coords[start:start + math.prod(token_shape)] = grid_coordinates(token_shape, axes)
    return host_to_device(coords, packed.token_ids.device)


def packed_positions(config: TransfusionConfig, packed: PackedBatch, coords: Tensor | None) -> Tensor:
    """Int['n'] sequence positions, or Int['n k'] axial positions with axial_rotary."""
    if not config.axial_rotary:
        return packed.positions
    starts = host_to_device(torch.tensor(packed.instance_starts, dtype = torch.long), coords.device) if packed.instance_starts else None
    first_latent = packed.positions[starts] if starts is not None else None
    text_like = sequence_positions(packed.positions, 1 + coords.shape[1])
    if first_latent is None:
        return text_like
    latent = axial_positions(first_latent[packed.instance.clamp(min = 0)], coords)
    return torch.where((packed.instance >= 0)[:, None], latent, text_like)


def packed_routing(config: TransfusionConfig, packed: PackedBatch, padded_length: int) -> Routing | None:
    """Experts by token type; pad tokens (flex padding) go to the text expert."""
    if not config.modality_experts:
        return None
    device = packed.token_ids.device
    text_like = torch.cat(((packed.instance < 0).nonzero_static(size = packed.length - sum(g.index.shape[0] for g in packed.groups)).reshape(-1),
                           torch.arange(packed.length, padded_length, device = device)))
    return Routing([(TEXT_EXPERT, text_like)] + [(1 + g.modality, g.index) for g in packed.groups])


def flex_padding(length: int, device: torch.device, config: TransfusionConfig) -> int:
    """Pad tokens that fill the last flex tile. On CPU with ALiBi, flex attention compiles each
    length of its own (attention.py): there the tiles are rounded up to a power of two, so that
    up to 2^k tiles compile k + 1 kernels, where every length past dynamo's recompile limit (8)
    ran the unfused kernel that materialises all n x n scores."""
    tiles = -(-length // FLEX_BLOCK)
    if device.type == 'cpu' and config.alibi_heads:
        tiles = 1 << (tiles - 1).bit_length()
    return tiles * FLEX_BLOCK - length


def packed_transformer_inputs(model, packed: PackedBatch, isolated: Tensor | None, kv_length: int | None):
    """(positions, mask, routing, instance, pad) for a packed sequence, padded to whole flex tiles
    on the flex backend (pad tokens form their own causal document -1, so no row is fully masked)."""
    config = model.config
    needs_coords = config.axial_rotary or config.alibi_heads > 0
    coords = packed_coordinates(config, packed) if needs_coords else None
    positions, document, instance = packed_positions(config, packed, coords), packed.document, packed.instance
    backend = resolve_backend(config.transformer.attention_backend, document.device)
    pad = flex_padding(packed.length, document.device, config) if kv_length is None and backend == 'flex' else 0
    if pad:
        positions = F.pad(positions, (0, 0, 0, pad) if positions.ndim == 2 else (0, pad))
        document, instance = F.pad(document, (0, pad), value = -1), F.pad(instance, (0, pad), value = -1)
        isolated = F.pad(isolated, (0, pad)) if isolated is not None else None
        coords = F.pad(coords, (0, 0, 0, pad)) if coords is not None else None
    rule = AttentionRule(document, instance, isolated, bidirectional_instances = not config.causal_modality_attention,
                         coords = coords, alibi_slopes = model.alibi.slopes if config.alibi_heads else None)
    mask = mask_for_rule(rule, backend, kv_length, sample_slices = packed.sample_slices)
    return positions, mask, packed_routing(config, packed, packed.length + pad), instance, pad


# cached decoding: new tokens of one row each

def step_positions(config: TransfusionConfig, starts: Tensor, count: int, shape: tuple[int, ...] | None = None) -> Tensor:
    """Rotary positions of `count` new tokens per row at slots starts[b] + j: Int['b q'], or
    Int['b q k'] with axial rotary, where the first prod(shape) tokens are an instance's latents."""
    slots = starts[:, None] + torch.arange(count, device = starts.device)
    if not config.axial_rotary:
        return slots
    positions = sequence_positions(slots, 1 + config.max_axes)
    if shape is None:
        return positions
    latents = math.prod(shape)
    coords = grid_coordinates(shape, config.max_axes, starts.device)                   # (l, a)
    instance = axial_positions(starts[:, None].expand(-1, latents), coords[None].expand(starts.shape[0], -1, -1))
    return torch.cat((instance, positions[:, latents:]), dim = 1)


def step_routing(config: TransfusionConfig, modality: int | None, rows: int, count: int, latents: int = 0, device = None) -> Routing | None:
    """Experts of `count` new tokens per row: text (modality None), or the first `latents` of each
    row from modality's expert and the rest from the text expert."""
    if not config.modality_experts:
        return None
    if modality is None or latents == count:
        return Routing.single(TEXT_EXPERT if modality is None else 1 + modality)
    flat = torch.arange(rows * count, device = device).reshape(rows, count)
    return Routing([(1 + modality, flat[:, :latents].reshape(-1)), (TEXT_EXPERT, flat[:, latents:].reshape(-1))])


def step_alibi(model, shape: tuple[int, ...]) -> Tensor | None:
    """Float['h l l'] ALiBi among the latents of an instance of `shape`, or None."""
    if not model.config.alibi_heads:
        return None
    coords = grid_coordinates(shape, max(len(shape), 1), model.device)
    return instance_alibi(coords, model.alibi.slopes)

"""A user's batch as typed items, validated: the first thing every entry point does with input.

Input conventions (README, Input conventions): a batch is a list of samples; a sample is a list of items
(or a single item); an item is
- an integer tensor: text, 1-D ids in [0, num_text_tokens) (0-d: one token);
- a floating tensor: an instance of modality 0;
- `(modality_index, floating tensor)`: an instance of that modality.
Modality tensors are (*axes, dim_latent), or (dim_latent, *axes) with channel_first; with an
encoder they are raw data and the encoder's output must be of that form.

Every user error raises ValueError/TypeError naming the sample and the item before anything
touches the model. Value checks (ids in range, finite latents) run once on the concatenated
batch, with a single host sync, and only on failure search for the offending item.

Glossary: c a modality's dim_latent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .config import TransfusionConfig
from .sampling_options import is_integer
from .transfer import EarlyFlag


@dataclass
class TextItem:
    ids: Tensor                      # Int['t']


@dataclass
class ModalityItem:
    modality: int
    data: Tensor                     # Float['*axes c'] canonical latent (after any encoder)
    wrapped: bool = True             # False: bare latents, begin/shape/end tokens written as text (sampling)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-1])


Sample = list  # list[TextItem | ModalityItem]


def _where(sample: int, item: int | None = None) -> str:
    return f'sample {sample}' if item is None else f'sample {sample}, item {item}'


def as_modality_index(value) -> int | None:
    """A modality index as a Python int: from an int, a NumPy int or a 0-d integer tensor (a bool
    would read as modality 1); None for anything else."""
    if torch.is_tensor(value) and value.ndim == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return int(value)
    return int(value) if is_integer(value) else None


def _parse_item(item, sample: int, index: int, num_modalities: int) -> tuple[str, int | None, Tensor]:
    """('text', None, ids) or ('modality', m, raw tensor), after type checks only."""
    where = _where(sample, index)
    if isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f'{where}: a modality item must be a (modality_index, tensor) pair, got a tuple of length {len(item)}')
        modality, data = item
        if (index := as_modality_index(modality)) is None:
            raise TypeError(f'{where}: modality index must be an int, got {type(modality).__name__}')
        modality = index
        if num_modalities == 0:
            raise ValueError(f'{where}: got modality {modality} but this model has no modalities (pass dim_latent to Transfusion)')
        if not 0 <= modality < num_modalities:
            raise ValueError(f'{where}: unknown modality index {modality}; this model has {num_modalities} modalit{"y" if num_modalities == 1 else "ies"} (0..{num_modalities - 1})')
        if not torch.is_tensor(data) or not data.is_floating_point():
            raise TypeError(f'{where}: modality {modality} data must be a floating tensor, got {_describe(data)}')
        return 'modality', modality, _with_data(data, where)
    if not torch.is_tensor(item):
        raise TypeError(f'{where}: expected an integer tensor (text), a floating tensor (modality 0) or a (modality_index, tensor) pair, got {type(item).__name__}')
    _with_data(item, where)
    if item.dtype == torch.bool or item.is_complex():
        raise TypeError(f'{where}: unsupported dtype {item.dtype}; text must be an integer tensor, a modality a floating tensor')
    if item.is_floating_point():
        if num_modalities == 0:
            raise ValueError(f'{where}: got a floating tensor (a modality) but this model has no modalities (pass dim_latent to Transfusion)')
        return 'modality', 0, item
    if item.ndim > 1:
        raise ValueError(f'{where}: text must be a 1-D tensor of token ids, got shape {tuple(item.shape)}')
    return 'text', None, item.reshape(-1).long()   # as int64: range checks on uint8 / int16 ids would wrap


def _describe(x) -> str:
    return f'tensor of dtype {x.dtype}' if torch.is_tensor(x) else type(x).__name__


def _with_data(x: Tensor, where: str) -> Tensor:
    if x.is_meta or x.layout != torch.strided:   # torch's own error would name neither sample nor item
        raise TypeError(f'{where}: expected a dense tensor holding values, got a {"meta" if x.is_meta else x.layout} tensor')
    return x


def _is_modality_pair(value) -> bool:
    """A (modality_index, tensor) pair for a one-item sample, its index read as `_parse_item` does."""
    index = value[0] if isinstance(value, tuple) and len(value) == 2 else None
    if torch.is_tensor(index):
        return index.ndim == 0 and not index.is_floating_point() and index.dtype != torch.bool
    return isinstance(index, int) and not isinstance(index, bool)


def parse_samples(batch, num_modalities: int, allow_empty: bool = False) -> list[list[tuple[str, int | None, Tensor]]]:
    """Structural validation of a list of samples; no values are inspected yet. allow_empty:
    empty samples are kept (sampling prompts), not refused."""
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f'a batch must be a list of samples (each a list of items), an integer tensor (b, n) or a floating tensor (b, ...); got {type(batch).__name__}')
    if len(batch) == 0:
        raise ValueError('the batch is empty: expected at least one sample')
    parsed = []
    for s, sample in enumerate(batch):
        items = [sample] if torch.is_tensor(sample) or _is_modality_pair(sample) else sample
        if not isinstance(items, (list, tuple)):
            raise TypeError(f'{_where(s)}: expected a list of items, got {type(sample).__name__}')
        parsed.append([_parse_item(item, s, j, num_modalities) for j, item in enumerate(items)])
        if not allow_empty and not any(kind == 'modality' or data.numel() > 0 for kind, _, data in parsed[-1]):
            raise ValueError(f'{_where(s)}: the sample is empty (no text tokens and no modality)')
    return parsed


def canonical_latent(data: Tensor, config: TransfusionConfig, modality: int, where: str) -> Tensor:
    """Check a latent against its modality's config and return it as Float['*axes c']."""
    spec = config.modalities[modality]
    if spec.channel_first:
        if data.ndim < 1 or data.shape[0] != spec.dim_latent:
            raise ValueError(f'{where}: modality {modality} expects channel-first latents (dim_latent={spec.dim_latent}, *axes), got shape {tuple(data.shape)}')
        data = data.movedim(0, -1)
    elif data.ndim < 1 or data.shape[-1] != spec.dim_latent:
        raise ValueError(f'{where}: modality {modality} expects latents (*axes, dim_latent={spec.dim_latent}), got shape {tuple(data.shape)}')
    axes = tuple(data.shape[:-1])
    if spec.num_axes is not None and len(axes) != spec.num_axes:
        raise ValueError(f'{where}: modality {modality} has {spec.num_axes} axes (default shape {spec.default_shape}), got latent shape {tuple(data.shape)} with {len(axes)}')
    if any(a == 0 for a in axes):
        raise ValueError(f'{where}: modality {modality} instance is empty (shape {tuple(data.shape)})')
    if any(a > config.max_shape_value for a in axes):
        raise ValueError(f'{where}: modality {modality} axis lengths {axes} exceed max_shape_value={config.max_shape_value}')
    if any(a % spec.downsample for a in axes):
        raise ValueError(f'{where}: modality {modality} is downsampled by {spec.downsample} on every axis, so its axes must be multiples of {spec.downsample}; got {axes}')
    if not spec.shape_tokens and axes != spec.default_shape:
        raise ValueError(f'{where}: modality {modality} has shape tokens off, so its shape is fixed at {spec.default_shape}; got {axes}')
    return data


# (modality, [(sample, item, raw tensor)]) -> latents in the user's layout, one per entry
Encode = Callable[[int, list[tuple[int, int, Tensor]]], list[Tensor]]


def to_items(batch, config: TransfusionConfig, encode: Encode, allow_empty: bool = False) -> tuple[list[Sample], 'ValueCheck']:
    """Validate and normalise a batch into lists of TextItem / ModalityItem (encoders applied).
    Types and shapes are checked here; the values' check is returned, to be raised by the caller
    (at once, or after queueing device work when the batch lives on an accelerator)."""
    parsed = parse_samples(batch, config.num_modalities, allow_empty)
    raw_by_modality: dict[int, list[tuple[int, int, Tensor]]] = {}
    for s, sample in enumerate(parsed):
        for j, (kind, modality, data) in enumerate(sample):
            if kind == 'modality':
                raw_by_modality.setdefault(modality, []).append((s, j, data))

    latents = {}
    for modality, entries in raw_by_modality.items():
        encoded = encode(modality, entries)
        for (s, j, _), latent in zip(entries, encoded):
            latents[s, j] = canonical_latent(latent, config, modality, _where(s, j))

    samples = [[TextItem(data) if kind == 'text' else ModalityItem(modality, latents[s, j]) for j, (kind, modality, data) in enumerate(sample)]
               for s, sample in enumerate(parsed)]
    return samples, ValueCheck(samples, config)


class ValueCheck:
    """Text ids in range and finite latents for a whole batch, as one flag.

    Host tensors are checked at once. For device tensors the flag is read back as soon as it is
    computed (EarlyFlag), so the caller can queue the forward first and call `raise_if_invalid`
    after it: that waits for the check alone, not for the forward. Until then nothing may
    change the model (the packed ids are clamped, so a bad id cannot trigger a device-side
    assert)."""

    def __init__(self, samples: list[Sample], config: TransfusionConfig):
        self.config = config
        self.texts = [(s, j, item.ids) for s, sample in enumerate(samples) for j, item in enumerate(sample) if isinstance(item, TextItem) and item.ids.numel()]
        self.latents = [(s, j, item.data) for s, sample in enumerate(samples) for j, item in enumerate(sample) if isinstance(item, ModalityItem)]
        flags = []
        if self.texts:
            ids = torch.cat([t.reshape(-1).to(self.texts[0][2].device) for _, _, t in self.texts])
            flags.append(((ids < 0) | (ids >= config.num_text_tokens)).any())
        if self.latents:
            device = self.latents[0][2].device
            values = torch.cat([x.reshape(-1).to(device) for _, _, x in self.latents])
            flags.append(~torch.isfinite(values).all())
        device = flags[0].device if flags else torch.device('cpu')
        self.flag = EarlyFlag(torch.stack([f.to(device) for f in flags]).any()) if flags else None
        if self.flag is not None and device.type == 'cpu':
            self.raise_if_invalid()
            self.flag = None   # checked: a later raise_if_invalid has nothing to do

    def raise_if_invalid(self) -> None:
        if self.flag is None or not self.flag.value():
            return
        limit = self.config.num_text_tokens
        for s, j, t in self.texts:
            bad = (t < 0) | (t >= limit)
            if bad.any():
                raise ValueError(f'{_where(s, j)}: text id {int(t[bad][0])} is outside [0, num_text_tokens={limit}); ids at and above {limit} are reserved for special tokens')
        for s, j, x in self.latents:
            if not torch.isfinite(x).all():
                raise ValueError(f'{_where(s, j)}: modality latent contains NaN or inf values')

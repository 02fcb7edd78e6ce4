"""From the user's list of samples to one packed token layout, validating on the way.

Input conventions (DESIGN.md 1.2): a batch is a list of samples; a sample is a list of items
(or a single item); an item is
- an integer tensor: text, 1-D ids in [0, num_text_tokens) (0-d: one token);
- a floating tensor: an instance of modality 0;
- `(modality_index, floating tensor)`: an instance of that modality.
Modality tensors are (*axes, dim_latent), or (dim_latent, *axes) with channel_first; with an
encoder they are raw data and the encoder's output must be of that form.

Every user error raises ValueError/TypeError naming the sample and the item before anything
touches the model. Value checks (ids in range, finite latents) run once on the concatenated
batch, with a single host sync, and only on failure search for the offending item.

Packed layout: all samples back to back in one sequence of n tokens,

    BOS  text  begin [shape tokens] latents end  text ...  EOS  | BOS ...

Glossary: n packed tokens, l latent tokens of one modality, c its dim_latent, i instances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import TransfusionConfig
from .tokens import Vocabulary


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


def _parse_item(item, sample: int, index: int, num_modalities: int) -> tuple[str, int | None, Tensor]:
    """('text', None, ids) or ('modality', m, raw tensor), after type checks only."""
    where = _where(sample, index)
    if isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f'{where}: a modality item must be a (modality_index, tensor) pair, got a tuple of length {len(item)}')
        modality, data = item
        if torch.is_tensor(modality) and modality.ndim == 0 and not modality.is_floating_point():
            modality = int(modality)
        if not isinstance(modality, int) or isinstance(modality, bool):
            raise TypeError(f'{where}: modality index must be an int, got {type(modality).__name__}')
        if not 0 <= modality < num_modalities:
            raise ValueError(f'{where}: unknown modality index {modality}; this model has {num_modalities} modalit{"y" if num_modalities == 1 else "ies"} (0..{num_modalities - 1})')
        if not torch.is_tensor(data) or not data.is_floating_point():
            raise TypeError(f'{where}: modality {modality} data must be a floating tensor, got {_describe(data)}')
        return 'modality', modality, data
    if not torch.is_tensor(item):
        raise TypeError(f'{where}: expected an integer tensor (text), a floating tensor (modality 0) or a (modality_index, tensor) pair, got {type(item).__name__}')
    if item.dtype == torch.bool or item.is_complex():
        raise TypeError(f'{where}: unsupported dtype {item.dtype}; text must be an integer tensor, a modality a floating tensor')
    if item.is_floating_point():
        if num_modalities == 0:
            raise ValueError(f'{where}: got a floating tensor (a modality) but this model has no modalities (pass dim_latent to Transfusion)')
        return 'modality', 0, item
    if item.ndim > 1:
        raise ValueError(f'{where}: text must be a 1-D tensor of token ids, got shape {tuple(item.shape)}')
    return 'text', None, item.reshape(-1)


def _describe(x) -> str:
    return f'tensor of dtype {x.dtype}' if torch.is_tensor(x) else type(x).__name__


def parse_samples(batch, num_modalities: int) -> list[list[tuple[str, int | None, Tensor]]]:
    """Structural validation of a list of samples; no values are inspected yet."""
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f'a batch must be a list of samples (each a list of items), an integer tensor (b, n) or a floating tensor (b, ...); got {type(batch).__name__}')
    if len(batch) == 0:
        raise ValueError('the batch is empty: expected at least one sample')
    parsed = []
    for s, sample in enumerate(batch):
        items = [sample] if torch.is_tensor(sample) or isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], int) else sample
        if not isinstance(items, (list, tuple)):
            raise TypeError(f'{_where(s)}: expected a list of items, got {type(sample).__name__}')
        parsed.append([_parse_item(item, s, j, num_modalities) for j, item in enumerate(items)])
        if not any(kind == 'modality' or data.numel() > 0 for kind, _, data in parsed[-1]):
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
    if not spec.shape_tokens and axes != spec.default_shape:
        raise ValueError(f'{where}: modality {modality} has shape tokens off, so its shape is fixed at {spec.default_shape}; got {axes}')
    return data


# (modality, [(sample, item, raw tensor)]) -> latents in the user's layout, one per entry
Encode = Callable[[int, list[tuple[int, int, Tensor]]], list[Tensor]]


def to_items(batch, config: TransfusionConfig, encode: Encode) -> list[Sample]:
    """Validate and normalise a batch into lists of TextItem / ModalityItem (encoders applied)."""
    parsed = parse_samples(batch, config.num_modalities)
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

    samples = []
    for s, sample in enumerate(parsed):
        items = []
        for j, (kind, modality, data) in enumerate(sample):
            items.append(TextItem(data) if kind == 'text' else ModalityItem(modality, latents[s, j]))
        samples.append(items)
    check_values(samples, config)
    return samples


def check_values(samples: list[Sample], config: TransfusionConfig) -> None:
    """Ids in range and finite latents, one host sync for the whole batch."""
    texts = [(s, j, item.ids) for s, sample in enumerate(samples) for j, item in enumerate(sample) if isinstance(item, TextItem) and item.ids.numel()]
    mods = [(s, j, item.data) for s, sample in enumerate(samples) for j, item in enumerate(sample) if isinstance(item, ModalityItem)]
    flags = []
    if texts:
        ids = torch.cat([t.reshape(-1).to(texts[0][2].device) for _, _, t in texts])
        flags.append(((ids < 0) | (ids >= config.num_text_tokens)).any())
    if mods:
        flags.append(torch.stack([~torch.isfinite(x).all() for _, _, x in mods]).to(flags[0].device if flags else mods[0][2].device).any())
    if not flags or not torch.stack([f.to(flags[0].device) for f in flags]).any().item():
        return
    for s, j, t in texts:
        bad = (t < 0) | (t >= config.num_text_tokens)
        if bad.any():
            value = int(t[bad][0])
            raise ValueError(f'{_where(s, j)}: text id {value} is outside [0, num_text_tokens={config.num_text_tokens}); ids at and above {config.num_text_tokens} are reserved for special tokens')
    for s, j, x in mods:
        if not torch.isfinite(x).all():
            raise ValueError(f'{_where(s, j)}: modality latent contains NaN or inf values')


# packing

@dataclass
class LatentGroup:
    """All latent tokens of one modality in a packed sequence."""
    modality: int
    index: Tensor                    # Int['l'] packed positions
    data: Tensor                     # Float['l c'] clean latents, raster order within each instance
    instance: Tensor                 # Int['l'] instance id of each token


@dataclass
class PackedBatch:
    token_ids: Tensor                # Int['n'] (latent slots hold 0, overwritten by projections)
    positions: Tensor                # Int['n'] index within its sample (rotary positions)
    document: Tensor                 # Int['n'] sample of each token
    instance: Tensor                 # Int['n'] modality instance of latent tokens, -1 elsewhere
    loss_index: Tensor               # Int['k'] positions whose next token is a text-loss target
    loss_targets: Tensor             # Int['k'] those next tokens
    groups: list[LatentGroup]
    instance_modality: list[int]
    instance_shape: list[tuple[int, ...]]
    instance_sample: list[int]
    instance_followed_by_text: Tensor  # Bool['i']
    sample_slices: list[tuple[int, int]]

    @property
    def num_instances(self) -> int:
        return len(self.instance_modality)

    @property
    def length(self) -> int:
        return self.token_ids.shape[0]


def instance_tokens(item: ModalityItem, vocab: Vocabulary, shape_tokens: bool) -> tuple[list[int], int]:
    """Ids that open the instance (begin and shape tokens) and its number of latent tokens."""
    opening = [vocab.begin[item.modality]] + (vocab.shape_ids(item.shape) if shape_tokens else [])
    return opening, math.prod(item.shape)


@dataclass
class _Layout:
    """Accumulates one packed sequence on the host."""
    special_positions: list = field(default_factory = list)
    special_ids: list = field(default_factory = list)
    target_positions: list = field(default_factory = list)
    text_starts: list = field(default_factory = list)
    text_ids: list = field(default_factory = list)
    instance_starts: list = field(default_factory = list)
    instance_lengths: list = field(default_factory = list)
    length: int = 0

    def special(self, ids: Sequence[int], target: bool) -> None:
        positions = range(self.length, self.length + len(ids))
        self.special_positions.extend(positions)
        self.special_ids.extend(ids)
        if target:
            self.target_positions.extend(positions)
        self.length += len(ids)

    def text(self, ids: Tensor) -> None:
        self.text_starts.append(self.length)
        self.text_ids.append(ids)
        self.target_positions.extend(range(self.length, self.length + ids.numel()))
        self.length += ids.numel()

    def latents(self, count: int) -> None:
        self.instance_starts.append(self.length)
        self.instance_lengths.append(count)
        self.length += count


def _spans(starts: list[int], lengths: list[int]) -> Tensor:
    """Concatenated aranges start..start+length-1, Int['sum(lengths)']."""
    lengths_t = torch.tensor(lengths, dtype = torch.long)
    offsets = torch.repeat_interleave(torch.tensor(starts, dtype = torch.long) - torch.cumsum(lengths_t, 0) + lengths_t, lengths_t)
    return offsets + torch.arange(int(lengths_t.sum()))


def pack(samples: list[Sample], config: TransfusionConfig, vocab: Vocabulary, device: torch.device, close: bool = True) -> PackedBatch:
    """Lay samples out back to back. close: end each sample with EOS (training); prompts stay open."""
    layout = _Layout()
    sample_slices, inst_modality, inst_shape, inst_sample, inst_followed, inst_data = [], [], [], [], [], []
    for s, sample in enumerate(samples):
        start = layout.length
        layout.special([vocab.bos], target = False)
        for j, item in enumerate(sample):
            if isinstance(item, TextItem):
                layout.text(item.ids.reshape(-1))
                continue
            opening, count = instance_tokens(item, vocab, config.modalities[item.modality].shape_tokens)
            if item.wrapped:
                layout.special(opening, target = True)
            layout.latents(count)
            if item.wrapped:
                layout.special([vocab.end[item.modality]], target = False)
            inst_modality.append(item.modality)
            inst_shape.append(item.shape)
            inst_sample.append(s)
            inst_followed.append(any(isinstance(later, TextItem) and later.ids.numel() for later in sample[j + 1:]))
            inst_data.append(item.data.reshape(count, -1))
        if close:
            layout.special([vocab.eos], target = True)
        sample_slices.append((start, layout.length))

    n = layout.length
    lengths = torch.tensor([b - a for a, b in sample_slices])
    document = torch.repeat_interleave(torch.arange(len(samples)), lengths)
    positions = torch.arange(n) - torch.repeat_interleave(torch.tensor([a for a, _ in sample_slices]), lengths)
    instance = torch.full((n,), -1, dtype = torch.long)
    token_ids = torch.zeros(n, dtype = torch.long)
    token_ids[torch.tensor(layout.special_positions, dtype = torch.long)] = torch.tensor(layout.special_ids, dtype = torch.long)
    if layout.instance_starts:
        latent_positions = _spans(layout.instance_starts, layout.instance_lengths)
        instance_of_token = torch.repeat_interleave(torch.arange(len(layout.instance_starts)), torch.tensor(layout.instance_lengths))
        instance[latent_positions] = instance_of_token
    targets = torch.tensor(sorted(layout.target_positions), dtype = torch.long)

    to = lambda t: t.to(device, non_blocking = True)
    token_ids, positions, document, instance, targets = map(to, (token_ids, positions, document, instance, targets))
    nonempty = [t for t in layout.text_ids if t.numel()]
    if nonempty:
        text_positions = to(_spans(layout.text_starts, [t.numel() for t in layout.text_ids]))
        token_ids = token_ids.index_put((text_positions,), torch.cat([t.to(device).long() for t in nonempty]))

    groups = []
    for modality in sorted(set(inst_modality)):
        members = [i for i, m in enumerate(inst_modality) if m == modality]
        groups.append(LatentGroup(
            modality = modality,
            index = to(_spans([layout.instance_starts[i] for i in members], [layout.instance_lengths[i] for i in members])),
            data = torch.cat([inst_data[i].to(device) for i in members]),
            instance = to(torch.repeat_interleave(torch.tensor(members), torch.tensor([layout.instance_lengths[i] for i in members]))),
        ))
    return PackedBatch(
        token_ids = token_ids, positions = positions, document = document, instance = instance,
        loss_index = targets - 1, loss_targets = token_ids[targets], groups = groups,
        instance_modality = inst_modality, instance_shape = inst_shape, instance_sample = inst_sample,
        instance_followed_by_text = to(torch.tensor(inst_followed, dtype = torch.bool)), sample_slices = sample_slices,
    )

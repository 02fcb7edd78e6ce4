"""Validated items (items.py) laid out back to back as one packed token sequence.

Packed layout: all samples back to back in one sequence of n tokens,

    BOS  text  begin [shape tokens] latents end  text ...  EOS  | BOS ...

Glossary: n packed tokens, l latent tokens of one modality, L its data rows (l times the U-Net's
downsampling), c its dim_latent, i instances, k text-loss targets.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .config import TransfusionConfig
from .items import ModalityItem, Sample, TextItem
from .transfer import cat_on_device, host_to_device
from .tokens import Vocabulary


@dataclass
class LatentGroup:
    """All latent tokens of one modality in a packed sequence. Without a U-Net, data rows and
    tokens coincide (L = l); with one, data stays at full resolution (L = l * downsample^A)."""
    modality: int
    index: Tensor                    # Int['l'] packed positions of its tokens
    data: Tensor                     # Float['L c'] clean latents, raster order within each instance
    instance: Tensor                 # Int['l'] instance id of each token
    data_instance: Tensor            # Int['L'] instance id of each data row
    shapes: list[tuple[int, ...]]    # latent (data) shape of each of its instances, in order


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
    instance_starts: list[int]       # packed position of each instance's first latent token

    @property
    def num_instances(self) -> int:
        return len(self.instance_modality)

    @property
    def length(self) -> int:
        return self.token_ids.shape[0]


def instance_tokens(item: ModalityItem, vocab: Vocabulary, spec) -> tuple[list[int], int]:
    """Ids that open the instance (begin and shape tokens of its transformer-side grid) and its
    number of latent tokens."""
    token_shape = spec.token_shape(item.shape)
    opening = [vocab.begin[item.modality]] + (vocab.shape_ids(token_shape) if spec.shape_tokens else [])
    return opening, math.prod(token_shape)


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


@dataclass
class _Instances:
    modality: list = field(default_factory = list)
    shape: list = field(default_factory = list)
    sample: list = field(default_factory = list)
    followed_by_text: list = field(default_factory = list)
    data: list = field(default_factory = list)


def _text_after(sample: Sample) -> list[bool]:
    """For each item, whether some text follows it in the sample (one backward pass)."""
    after, seen = [False] * len(sample), False
    for j in range(len(sample) - 1, -1, -1):
        after[j] = seen
        seen = seen or (isinstance(sample[j], TextItem) and sample[j].ids.numel() > 0)
    return after


def _lay_out(samples: list[Sample], config: TransfusionConfig, vocab: Vocabulary, close: bool):
    """Walk the samples once, recording where every token goes (host-side lists only)."""
    layout, instances, sample_slices = _Layout(), _Instances(), []
    for s, sample in enumerate(samples):
        start = layout.length
        layout.special([vocab.bos], target = False)
        text_after = _text_after(sample)
        for j, item in enumerate(sample):
            if isinstance(item, TextItem):
                layout.text(item.ids.reshape(-1))
                continue
            opening, count = instance_tokens(item, vocab, config.modalities[item.modality])
            if item.wrapped:
                layout.special(opening, target = True)
            layout.latents(count)
            if item.wrapped:
                layout.special([vocab.end[item.modality]], target = False)
            instances.modality.append(item.modality)
            instances.shape.append(item.shape)
            instances.sample.append(s)
            instances.followed_by_text.append(text_after[j])
            instances.data.append(item.data.reshape(math.prod(item.shape), -1))
        if close:
            layout.special([vocab.eos], target = True)
        sample_slices.append((start, layout.length))
    return layout, instances, sample_slices


def _host_index_arrays(layout: _Layout, instances: _Instances, sample_slices: list, modalities: list[int]) -> dict[str, array]:
    """Every per-token integer array of the packed batch, built in plain Python: tiny torch ops
    on the host wake the intra-op thread pool each time, which measured ~2 ms per op on a
    16-thread host (benchmarks/results/h200_profile.log) and far worse on a contended one."""
    n = layout.length
    token_ids, instance = array('q', bytes(8 * n)), array('q', [-1]) * n
    for position, token in zip(layout.special_positions, layout.special_ids):
        token_ids[position] = token
    for i, (a, count) in enumerate(zip(layout.instance_starts, layout.instance_lengths)):
        instance[a:a + count] = array('q', [i]) * count
    document, positions = array('q'), array('q')
    for s, (a, b) in enumerate(sample_slices):
        document.extend(array('q', [s]) * (b - a))
        positions.extend(range(b - a))
    text_positions = array('q')
    for a, ids in zip(layout.text_starts, layout.text_ids):
        text_positions.extend(range(a, a + ids.numel()))
    arrays = dict(token_ids = token_ids, document = document, positions = positions, instance = instance,
                  targets = array('q', layout.target_positions), text_positions = text_positions,
                  followed = array('q', map(int, instances.followed_by_text)))
    for modality in modalities:
        index, owner, data_owner = array('q'), array('q'), array('q')
        for i, m in enumerate(instances.modality):
            if m == modality:
                a, count = layout.instance_starts[i], layout.instance_lengths[i]
                index.extend(range(a, a + count))
                owner.extend(array('q', [i]) * count)
                data_owner.extend(array('q', [i]) * math.prod(instances.shape[i]))
        arrays[f'index_{modality}'], arrays[f'instance_{modality}'] = index, owner
        if data_owner != owner:  # a U-Net: data rows outnumber tokens
            arrays[f'data_instance_{modality}'] = data_owner
    return arrays


def pack(samples: list[Sample], config: TransfusionConfig, vocab: Vocabulary, device: torch.device, close: bool = True) -> PackedBatch:
    """Lay samples out back to back. close: end each sample with EOS (training); prompts stay open."""
    layout, instances, sample_slices = _lay_out(samples, config, vocab, close)
    modalities = sorted(set(instances.modality))
    arrays = _host_index_arrays(layout, instances, sample_slices, modalities)
    joined = array('q')
    for values in arrays.values():
        joined.extend(values)
    flat = torch.frombuffer(joined, dtype = torch.long) if joined else torch.zeros(0, dtype = torch.long)
    flat = host_to_device(flat, device)                                          # one transfer for all of them
    host = dict(zip(arrays, flat.split([len(v) for v in arrays.values()])))

    token_ids = host['token_ids']
    nonempty = [t for t in layout.text_ids if t.numel()]
    if nonempty:
        text_ids = cat_on_device(nonempty, device).clamp(0, vocab.size - 1)  # int64 since parsing; clamped: see ValueCheck
        token_ids = token_ids.index_put((host['text_positions'],), text_ids)
    groups = [
        LatentGroup(
            modality = modality, index = host[f'index_{modality}'], instance = host[f'instance_{modality}'],
            data_instance = host.get(f'data_instance_{modality}', host[f'instance_{modality}']),
            data = cat_on_device([instances.data[i] for i, m in enumerate(instances.modality) if m == modality], device),
            shapes = [shape for shape, m in zip(instances.shape, instances.modality) if m == modality],
        )
        for modality in modalities
    ]
    return PackedBatch(
        token_ids = token_ids, positions = host['positions'], document = host['document'], instance = host['instance'],
        loss_index = host['targets'] - 1, loss_targets = token_ids[host['targets']], groups = groups,
        instance_modality = instances.modality, instance_shape = instances.shape, instance_sample = instances.sample,
        instance_followed_by_text = host['followed'].bool(), sample_slices = sample_slices,
        instance_starts = layout.instance_starts,
    )

"""A static, preallocated key/value cache written at explicit positions.

The tensors are allocated once for the longest sequence; a step reads a view of the first slots
(as many as its rows have filled, so its cost follows the tokens so far, not max_length), and
repeated steps over the same view have static shapes (what CUDA graphs and torch.compile need).
Each row of the batch is one sample; a step writes its new tokens' keys and values at given
slots, and the attention mask hides the slots a row has not written yet. Which slots are valid
is the sampler's business, not the cache's.

Each layer owns separate key and value tensors (not views of one large tensor), so a compiled
step can update them in place instead of copying the whole cache.

Glossary: b batch, h heads, s cache slots, e head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """keys[layer], values[layer]: Float['b h s e'], zero-initialised."""

    def __init__(self, layers: int, batch: int, heads: int, slots: int, dim_head: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, heads, slots, dim_head)
        self.keys = [torch.zeros(shape, device = device, dtype = dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device = device, dtype = dtype) for _ in range(layers)]

    @classmethod
    def for_model(cls, model, batch: int, slots: int) -> 'KVCache':
        """A cache shaped for `model`'s transformer, in the dtype attention will compute in
        (the autocast dtype when autocast is on for the model's device, unless the model is in
        float64, which autocast never casts)."""
        config = model.transformer.config
        device = model.device
        dtype = model.token_embedding.weight.dtype
        if torch.is_autocast_enabled(device.type) and dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device.type)
        return cls(config.depth, batch, config.heads, slots, config.dim_head, device, dtype)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def tensors(self) -> list[Tensor]:
        return self.keys + self.values

    def layer_views(self, write_positions: Tensor, visible: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer (keys, values, write_positions) for `Transformer.forward(cache=...)`.
        write_positions: Int['b n'] slots per row, or Int['n'] shared by all rows.
        visible: attend over the first `visible` slots only (views, so writes land in the
            cache); every write position must lie below it."""
        return [(k[:, :, :visible], v[:, :, :visible], write_positions) for k, v in zip(self.keys, self.values)]

    def rows(self, index: Tensor, visible: int | None = None) -> 'KVCache':
        """A new cache holding copies of the given rows (of their first `visible` slots)."""
        subset = KVCache.__new__(KVCache)
        subset.keys = [k[index, :, :visible] for k in self.keys]
        subset.values = [v[index, :, :visible] for v in self.values]
        return subset

    def copy_rows_(self, source: 'KVCache', destination_rows: Tensor) -> None:
        """Write all rows of `source` into rows `destination_rows` of this cache."""
        for mine, theirs in zip(self.tensors(), source.tensors()):
            mine[destination_rows] = theirs

    def copy_slots_(self, source: 'KVCache', destination_rows: Tensor, slots: Tensor) -> None:
        """Write slots Int['b q'] of each row of `source` (row i's slots are slots[i]) into rows
        destination_rows Int['b'] of this cache. A step on a copy of some rows writes only its
        new tokens' slots, so copying back just those is a sliver of copying whole rows."""
        source_rows = torch.arange(slots.shape[0], device = slots.device)[:, None]
        for mine, theirs in zip(self.tensors(), source.tensors()):
            mine[destination_rows[:, None], :, slots] = theirs[source_rows, :, slots]

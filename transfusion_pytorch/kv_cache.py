"""A static, preallocated key/value cache written at explicit positions.

Shapes never change after allocation, so decoding steps have static shapes (what CUDA graphs
and torch.compile need). Each row of the batch is one sample; a step writes its new tokens'
keys and values at per-row positions, and the attention mask (masks.prefix_mask) hides the
slots a row has not written yet. Which slots are valid is the sampler's business, not the
cache's.

Glossary: l layers, b batch, h heads, s cache slots, e head dim, n new tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """keys, values: Float['l b h s e'], zero-initialised."""

    def __init__(self, layers: int, batch: int, heads: int, slots: int, dim_head: int, device: torch.device, dtype: torch.dtype):
        shape = (layers, batch, heads, slots, dim_head)
        self.keys = torch.zeros(shape, device = device, dtype = dtype)
        self.values = torch.zeros(shape, device = device, dtype = dtype)

    @classmethod
    def for_model(cls, model, batch: int, slots: int) -> 'KVCache':
        """A cache shaped for `model`'s transformer, in the dtype attention will compute in
        (the autocast dtype when autocast is on for the model's device)."""
        config = model.transformer.config
        device = model.device
        dtype = model.token_embedding.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return cls(config.depth, batch, config.heads, slots, config.dim_head, device, dtype)

    @property
    def slots(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def layer_views(self, write_positions: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer (keys, values, write_positions) for `Transformer.forward(cache=...)`.
        write_positions: Int['b n'] slots the new tokens go to."""
        return [(self.keys[layer], self.values[layer], write_positions) for layer in range(self.keys.shape[0])]

    def rows(self, index: Tensor) -> 'KVCache':
        """A new cache holding copies of the given rows (for expanding a prompt over a batch)."""
        subset = KVCache.__new__(KVCache)
        subset.keys = self.keys[:, index].clone()
        subset.values = self.values[:, index].clone()
        return subset

    def copy_rows_(self, source: 'KVCache', destination_rows: Tensor) -> None:
        """Write all rows of `source` into rows `destination_rows` of this cache."""
        self.keys[:, destination_rows] = source.keys
        self.values[:, destination_rows] = source.values

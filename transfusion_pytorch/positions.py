"""Rotary position embedding (Su et al. 2021) over integer positions.

Positions are the flattened sequence index within each sample, latent tokens in raster order
(the paper's choice), so every latent token carries its own position.

Glossary: b batch (or 1), h heads, n tokens, e head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Maps positions Int['b n'] to (cos, sin), each Float['b 1 n e/2'] in fp32."""

    def __init__(self, dim_head: int, theta: float = 10_000.):
        super().__init__()
        inv_freq = theta ** -(torch.arange(0, dim_head, 2, dtype = torch.float32) / dim_head)
        self.register_buffer('inv_freq', inv_freq, persistent = False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq        # (b, n, e/2)
        angles = angles[:, None]                                                # (b, 1, n, e/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate Float['... b h n e'] by the angles (cos, sin: Float['b 1 n e/2']); the two halves
    of e form the rotation pairs. Computed in fp32, returned in x's dtype."""
    first, second = x.float().chunk(2, dim = -1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim = -1)
    return rotated.to(x.dtype)

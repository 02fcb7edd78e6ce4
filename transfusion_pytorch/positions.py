"""Rotary position embedding (Su et al. 2021), 1-D or axial over several position components.

Default: one integer position per token, the flattened sequence index within its sample, latent
tokens in raster order (the paper's choice), so every latent token carries its own position and
a 1-D modality (actions over time) gets rotary over time.

Axial option: each token carries k position components, Int['b n k']; the head dim's rotary
frequencies are split into k contiguous sections, section j rotated by component j. A token
whose components are all equal (text: (p, p, ..., p)) is rotated exactly as by 1-D rotary at p,
while a latent token of an N-d grid gets (o, o + c_1, ..., o + c_N), o the instance's first
position and c its grid coordinates, so attention inside an image depends on offsets along each
axis (Su's axial form, as in multimodal RoPE variants).

Glossary: b batch (or 1), h heads, n tokens, e head dim, k position components.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .constants import ConstantTables, at_least_fp32


class RotaryEmbedding(ConstantTables):
    """Maps positions Int['b n'] or Int['b n k'] to (cos, sin), each Float['b 1 n e/2'] in fp32."""

    def __init__(self, dim_head: int, theta: float = 10_000.):
        super().__init__()
        self.dim_head, self.theta = dim_head, theta
        self.register_tables()

    def tables(self, device) -> dict[str, Tensor]:
        exponents = torch.arange(0, self.dim_head, 2, dtype = torch.float32, device = device) / self.dim_head
        return dict(inv_freq = self.theta ** -exponents)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        positions = positions.to(torch.float32)
        if positions.ndim == 3:
            # frequency f takes component f * k // (e/2): contiguous sections, highest frequencies first
            frequencies = self.inv_freq.shape[0]
            component = torch.arange(frequencies, device = positions.device) * positions.shape[-1] // frequencies
            angles = positions[..., component] * self.inv_freq                 # (b, n, e/2)
        else:
            angles = positions[..., None] * self.inv_freq                      # (b, n, e/2)
        angles = angles[:, None]                                                # (b, 1, n, e/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate Float['... b h n e'] by the angles (cos, sin: Float['b 1 n e/2']); the two halves
    of e form the rotation pairs. Computed in at least fp32 (fp64 stays fp64), returned in x's dtype."""
    first, second = at_least_fp32(x).chunk(2, dim = -1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim = -1)
    return rotated.to(x.dtype)


def axial_positions(start: Tensor, coords: Tensor) -> Tensor:
    """Int['... k'] axial positions (o, o + c_1, ..., o + c_N) for tokens with grid coordinates
    coords Int['... N'] in an instance starting at position start Int['...']."""
    start = start[..., None]
    return torch.cat((start, start + coords), dim = -1)


def sequence_positions(positions: Tensor, components: int) -> Tensor:
    """Int['... k'] axial positions of text-like tokens: the sequence position in every component."""
    return positions[..., None].expand(*positions.shape, components)

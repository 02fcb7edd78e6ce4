"""A one-level U-Net around the transformer for one modality (simple diffusion, Hoogeboom et al.
2023: downsample early, let the transformer work at low resolution, upsample with skips).

Down: a per-position MLP lifts latents to full-resolution features (kept as the skip), then
space-to-depth by `factor` on every axis and a projection to the model dim give one token per
factor^A block. The transformer is the attention in the middle. Up: a projection and
depth-to-space bring its output back to full resolution, concatenated with the skip, and a
per-position MLP predicts the velocity. Works for any number of axes.

Glossary: b instances (of one shape), c dim_latent, u unet_dim, d model dim, l tokens, A axes,
f factor.
"""
from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn
import torch


def _space_to_depth_pattern(axes: int) -> str:
    grid = ' '.join(f'(a{i} f{i})' for i in range(axes))
    return f'b {grid} u -> b ({" ".join(f"a{i}" for i in range(axes))}) ({" ".join(f"f{i}" for i in range(axes))} u)'


def _depth_to_space_pattern(axes: int) -> str:
    left, right = _space_to_depth_pattern(axes).split(' -> ')
    return f'{right} -> {left}'


class LatentUNet(nn.Module):
    def __init__(self, dim_latent: int, dim_model: int, factor: int, axes: int, dim_hidden: int | None = None):
        super().__init__()
        dim_hidden = dim_hidden or 4 * dim_latent
        self.factor, self.axes = factor, axes
        block = factor ** axes
        self.stem = nn.Sequential(nn.Linear(dim_latent, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim_hidden))
        self.down = nn.Linear(block * dim_hidden, dim_model)
        self.up = nn.Linear(dim_model, block * dim_hidden)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(2 * dim_hidden, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim_latent))

    def _sizes(self, shape: tuple[int, ...]) -> dict:
        return {f'f{i}': self.factor for i in range(self.axes)} | {f'a{i}': a // self.factor for i, a in enumerate(shape)}

    def encode(self, x: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """x Float['b L c'] (L = prod(shape), raster order) -> tokens Float['b l d'] and the skip
        Float['b L u']."""
        skip = self.stem(x)
        grid = skip.reshape(skip.shape[0], *shape, skip.shape[-1])
        blocks = rearrange(grid, _space_to_depth_pattern(self.axes), **self._sizes(shape))
        return self.down(blocks), skip

    def decode(self, hidden: Tensor, skip: Tensor, shape: tuple[int, ...]) -> Tensor:
        """hidden Float['b l d'] and skip Float['b L u'] -> velocity Float['b L c']."""
        blocks = self.up(hidden)
        grid = rearrange(blocks, _depth_to_space_pattern(self.axes), **self._sizes(shape))
        full = grid.reshape(grid.shape[0], math.prod(shape), grid.shape[-1])
        return self.head(torch.cat((full, skip), dim = -1))

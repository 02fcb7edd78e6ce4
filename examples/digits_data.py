"""scikit-learn's bundled 8x8 handwritten digits (no download) as Transfusion samples.

An image becomes a grid of latent patches: with patch 2, the 8x8 image is a 4x4 grid of 4-d
latents (16 latent tokens); with patch 1, an 8x8 grid of 1-d latents. Pixels 0-16 are scaled to
[-1, 1], the usual range for a flow from standard normal noise.

A training sample is either `[label, image]` (generation: text then image) or `[image, label]`
(captioning: image then text), the label being one text token 0-9.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PIXEL_MAX = 16.


@dataclass
class DigitSplit:
    images: Tensor          # Float['n 8 8'] in [-1, 1]
    labels: Tensor          # Int['n']


def load_splits(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[DigitSplit, DigitSplit]:
    """Train and held-out test splits, stratified by label. The split seed is fixed separately
    from the training seed so that every run is judged on the same held-out digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype = torch.float32) / (PIXEL_MAX / 2) - 1
    labels = torch.tensor(digits.target, dtype = torch.long)
    train_index, test_index = train_test_split(
        range(len(labels)), test_size = test_fraction, stratify = digits.target, random_state = split_seed)
    pick = lambda index: DigitSplit(images[index], labels[index])
    return pick(train_index), pick(test_index)


def to_latents(images: Tensor, patch: int) -> Tensor:
    """Float['n 8 8'] -> Float['n g g c'] with g = 8 / patch, c = patch * patch (raster order)."""
    n, size = images.shape[0], images.shape[-1]
    grid = size // patch
    patches = images.reshape(n, grid, patch, grid, patch).permute(0, 1, 3, 2, 4)
    return patches.reshape(n, grid, grid, patch * patch)


def from_latents(latents: Tensor, patch: int) -> Tensor:
    """Inverse of to_latents for one image or a batch: Float['... g g c'] -> Float['... 8 8']."""
    *lead, grid, _, _ = latents.shape
    patches = latents.reshape(*lead, grid, grid, patch, patch)
    patches = patches.movedim(-2, -3)                          # (..., g, p, g, p)
    return patches.reshape(*lead, grid * patch, grid * patch)


def to_pixels(images: Tensor):
    """[-1, 1] images back to sklearn's 0-16 pixel scale, as numpy for the classifiers."""
    return ((images.clamp(-1, 1) + 1) * (PIXEL_MAX / 2)).numpy()


class Batches:
    """Random training batches with both orders mixed: `generation_fraction` of the samples put
    the label first. Batch `step` depends only on (seed, step), so every torchrun worker draws
    the same global batch and takes its own slice of it."""

    def __init__(self, split: DigitSplit, patch: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, generation_fraction: float = 0.5):
        if batch_size % world_size:
            raise ValueError(f'--batch-size {batch_size} must be divisible by the number of workers {world_size}')
        self.latents = to_latents(split.images, patch)
        self.labels = split.labels
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.generation_fraction = generation_fraction

    def __call__(self, step: int) -> list[list[Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.randint(0, len(self.labels), (self.batch_size,), generator = generator)
        label_first = torch.rand(self.batch_size, generator = generator) < self.generation_fraction
        share = self.batch_size // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        batch = []
        for i, first in zip(index[mine].tolist(), label_first[mine].tolist()):
            label, image = self.labels[i:i + 1], self.latents[i]
            batch.append([label, image] if first else [image, label])
        return batch

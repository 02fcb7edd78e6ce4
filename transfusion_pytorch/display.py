"""Readable printing of samples."""
from __future__ import annotations

import torch


def describe_item(item) -> str:
    if isinstance(item, tuple):
        modality, data = item
        return f'[modality {modality}: {tuple(data.shape)}, mean {data.float().mean():.3f}, std {data.float().std():.3f}]' if data.numel() > 1 else f'[modality {modality}: {tuple(data.shape)}]'
    if torch.is_tensor(item) and item.is_floating_point():
        return describe_item((0, item))
    ids = item.reshape(-1).tolist()
    shown = ' '.join(map(str, ids[:32])) + (' ...' if len(ids) > 32 else '')
    return f'[text: {len(ids)} tokens] {shown}'


def print_modality_sample(sample: list) -> None:
    """Print one sample (a list of items as returned by `Transfusion.sample`), one line per item."""
    for item in sample:
        print(describe_item(item))

"""Running a module in eval mode for a while: inference-like paths (prediction, sampling, frozen
coders) must not see dropout or update statistics, and must hand the module back as it was."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module):
    """`module.eval()` inside the block; its previous mode (train or eval) restored after it,
    also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)

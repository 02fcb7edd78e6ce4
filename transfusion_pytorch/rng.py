"""Random-number-generator state of this process, as tensors and plain containers (so it can be
saved in a checkpoint that is loaded with torch.load(weights_only=True)): torch (CPU and the
initialised CUDA devices), Python's `random`, and NumPy's global generator when NumPy is imported.
"""
from __future__ import annotations

import random
import sys

import torch


def rng_state() -> dict:
    """This process's RNG states: torch (CPU and initialised CUDA devices), Python's `random`,
    and NumPy's global generator when NumPy is imported, as tensors and plain containers."""
    state = {'torch': torch.get_rng_state(), 'python': random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get('numpy')
    if numpy is not None:
        name, keys, position, has_gauss, cached = numpy.random.get_state(legacy = True)
        state['numpy'] = (name, torch.from_numpy(keys.astype('int64')), position, has_gauss, cached)
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state['torch'].cpu())
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
    numpy = sys.modules.get('numpy')
    if 'numpy' in state and numpy is not None:
        name, keys, position, has_gauss, cached = state['numpy']
        numpy.random.set_state((name, keys.cpu().numpy().astype('uint32'), position, has_gauss, cached))

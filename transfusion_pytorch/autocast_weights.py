"""Casting the linear weights once per sampling call under autocast, not at every step.

Under `torch.autocast` a linear layer's fp32 weight and bias are cast to the autocast dtype each
time the layer runs. Eager autocast keeps those casts for the length of the autocast region, but
compiled code (`compile_blocks`, the compiled text step) and CUDA graphs redo them on every call:
per decoded token, one read of all fp32 weights and one write of their half-size copies, more
memory traffic than the products themselves, which read only the copies.

Sampling runs without gradients, so the weights cannot change during a call. `AutocastWeights`
casts each linear weight once into a buffer of the autocast dtype and puts the buffers in place
of the parameters while sampling runs; autocast then finds its operands already in its dtype and
casts nothing. The results are bitwise the same: a cast rounds the same way wherever it runs.

On CPU the biases stay in fp32: compiled CPU code adds a bias apart from its product
(`experts.run_linear`), in fp32 before the one rounding to the autocast dtype, and eager
autocast keeps its cast of a bias parameter for the whole region anyway.

Only the package's own `nn.Linear` layers are swapped, never a user's encoder or decoder, which
may read its weights in ways autocast does not cast, nor the time MLP and the latent projections,
which run outside autocast. Parameters that are not plain fp32 tensors (a model already in bf16,
FSDP2's DTensors) are left alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype autocast would cast `model`'s fp32 linear weights to in this context, or None
    (autocast off for the model's device, or gradients enabled: a copy would cut the graph)."""
    device = model.device.type
    if torch.is_grad_enabled() or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == torch.float32 else dtype


def own_linears(model: nn.Module) -> Iterator[nn.Linear]:
    """The model's nn.Linear layers but the user's modality encoders and decoders and the layers
    that run outside autocast (modality.full_precision_linear)."""
    modalities = model.modalities
    left_alone = {id(m) for part in (modalities.encoders, modalities.decoders) for m in part.modules()}
    left_alone |= {id(layer) for layer in modalities.full_precision_layers()}
    return (m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in left_alone)


def _plain_fp32(param: Tensor | None) -> bool:
    return param is not None and type(param.data) is Tensor and param.dtype == torch.float32


class AutocastWeights:
    """Autocast-dtype copies of a model's linear weights and biases, swapped in by `swapped()`.

    The copies are nn.Parameters without gradients, so compiled code treats them as it treats
    the weights (CUDA graphs keep reading them at their addresses), and are refreshed from the
    current parameters on every swap: an object kept across calls (the text decoder keeps one)
    never serves stale weights after training, `load_state_dict` or `.to()`.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        biases_too = model.device.type != 'cpu'   # see the module docstring
        with torch.inference_mode(False):   # kept copies are refreshed in place, also outside inference mode
            self.slots: list[tuple[nn.Module, str, nn.Parameter]] = [
                (layer, name, nn.Parameter(torch.empty_like(param, dtype = dtype), requires_grad = False))
                for layer in own_linears(model)
                for name, param in layer._parameters.items()
                if _plain_fp32(param) and (biases_too or name != 'bias')
            ]

    @contextmanager
    def swapped(self):
        """The copies, refreshed, in place of the parameters inside the block; the parameters
        restored after it, also when the block raises."""
        originals = []
        try:
            with torch.no_grad():
                for layer, name, copy in self.slots:
                    param = layer._parameters.get(name)
                    if _plain_fp32(param) and param.shape == copy.shape and param.device == copy.device:
                        copy.copy_(param)
                        originals.append((layer, name, param))
                        layer._parameters[name] = copy   # direct: nn.Module's setattr checks types
            yield
        finally:
            for layer, name, param in originals:
                layer._parameters[name] = param


@contextmanager
def weights_cast_once(model: nn.Module, kept: dict | None = None):
    """Inside the block, under autocast without gradients, the model's linear layers hold
    autocast-dtype copies of their weights (see the module docstring); otherwise nothing changes.

    kept: a dict in which the copies are kept by dtype for later calls (their buffers, not their
        values: those are refreshed each time), for callers whose compiled code or CUDA graphs
        should see the same addresses on every call."""
    dtype = autocast_dtype(model)
    if dtype is None:
        yield
        return
    weights = kept.get(dtype) if kept is not None else None
    if weights is None:
        weights = AutocastWeights(model, dtype)
        if kept is not None:
            kept[dtype] = weights
    with weights.swapped():
        yield

"""The blocks' weights packed once for MKL, for the repeated small products of ODE evaluations on
CPU.

An ODE evaluation on CPU multiplies a few dozen rows (one modality instance's tokens) by every
block weight, 30 times per instance with nothing changing but the rows' values. MKL's ordinary
sgemm copies the weight into its packed panel layout inside every such product: sampled with
perf over 64-token evaluations at dim 256, depth 4 on 2 cores, that copy
(mkl_blas_avx512_sgemm_scopy_right48_ea) took 18% of all CPU time, against 32% for the
multiplication kernel itself. MKL can pack a weight once (cblas_sgemm_pack) and multiply by the
packed form (cblas_sgemm_compute); PyTorch exposes both as mkl::_mkl_reorder_linear_weight and
mkl::_mkl_linear. With them, generate_modality_only (64 latent tokens, 30 evaluations, fp32)
took 152.6 instead of 170.6 ms a call (medians of 20 calls, packing on and off alternating in
one process).

Used only where it is safe and pays: fp32 products (MKL's packed sgemm), no autocast, no
gradients (mkl::_mkl_linear has no backward), single-expert layers, and inside the compiled
evaluation, whose rows are known when the solve starts. A pack is made for one row count and
lives for one sampling call (the runner keeps it for the call's later solves of that count):
nothing may change the weights during a call, but between calls they may change in ways no
key can see. Writes through `.data` (the usual EMA libraries) keep a weight's storage and its
version counter; packs kept on the model across calls sampled from the stale weights. Packing
the 16 weights of dim 256, depth 4 takes about 2.7 ms (2 cores, median of 30), about 2% of a
64-token call. Resident memory during a call: about 1.15x the packed weights.

Inductor lowers mkl::_mkl_linear only for weights frozen into the compiled code as constants,
which would keep stale weights after training; `calls_packed_products` has it call the op on
the weights it is given instead, while the evaluation compiles.

Glossary: b rows, n tokens, i input features, o output features.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

# Tests turn this off to compare against MKL's ordinary products.
ENABLED = True


class Pack(NamedTuple):
    """A weight packed by MKL for products of `rows` rows."""
    weight: Tensor
    rows: int


@dataclass
class BlockPacks:
    """One block's packed weights; None: that product runs unpacked."""
    qkv: Pack | None = None
    attn_out: Pack | None = None
    ff_in: Pack | None = None
    ff_out: Pack | None = None


def _packable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32 and layer.weight.device.type == 'cpu'


def available() -> bool:
    """Whether this PyTorch has the MKL ops and the Inductor hook they need here."""
    try:
        from torch._inductor import lowering   # noqa: F401
    except ImportError:
        return False
    mkl = getattr(torch.ops, 'mkl', None)
    return bool(torch._C.has_mkl) and hasattr(mkl, '_mkl_linear') and hasattr(mkl, '_mkl_reorder_linear_weight')


def block_packs(model, rows: int) -> list[BlockPacks] | None:
    """Every block's weights packed for products of `rows` rows, or None where packing does not
    apply (see the module docstring)."""
    if not (ENABLED and available()) or torch.is_grad_enabled() or torch.is_autocast_enabled('cpu'):
        return None
    packs = []
    for block in model.transformer.blocks:
        layers = dict(qkv = block.attn.to_qkv, attn_out = block.attn.to_out,
                      ff_in = None if block.ff.pad else block.ff.to_hidden, ff_out = None if block.ff.pad else block.ff.to_out)
        packs.append(BlockPacks(**{name: _pack(layer, rows) for name, layer in layers.items()}))
    return packs


def _pack(layer: nn.Module | None, rows: int) -> Pack | None:
    if layer is None or not _packable(layer):
        return None
    return Pack(torch.ops.mkl._mkl_reorder_linear_weight(layer.weight.detach(), rows), rows)


def packed_product(layer: nn.Linear, x: Tensor, pack: Pack) -> Tensor:
    """x Float['b n i'] @ layer.weight.T -> Float['b n o'] by the weight's MKL pack (no bias).
    Products of another row count than the pack's run unpacked (mkl::_mkl_linear checks)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.ops.mkl._mkl_linear(flat, pack.weight, layer.weight, None, pack.rows).reshape(*x.shape[:-1], -1)


@contextmanager
def calls_packed_products():
    """While Inductor compiles: mkl::_mkl_linear becomes a call of the op itself (as for any op
    Inductor has no lowering of), in place of its lowering for frozen weights. Restored after."""
    if not available():
        yield
        return
    from torch._inductor import lowering
    op = torch.ops.mkl._mkl_linear.default
    saved = lowering.lowerings.get(op)
    lowering.register_lowering(op, type_promotion_kind = None)(lowering.fallback_handler(op, add_to_fallback_set = False))
    try:
        yield
    finally:
        if saved is None:
            lowering.lowerings.pop(op, None)
        else:
            lowering.lowerings[op] = saved

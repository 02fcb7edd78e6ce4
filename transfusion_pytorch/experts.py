"""Mixture of experts by modality (as in pi-zero and Mixture-of-Transformers, Liang et al. 2024):
text-like tokens and each modality's latent tokens use their own projection weights, while
attention itself is shared over the whole sequence.

Routing is decided by the token layout, not learned: expert 0 is text (and every text-like
token: begin, shape and end tokens), expert 1 + m is modality m. The caller gives the token
indices of each expert, computed on the host, so routing needs no host-device sync.

Glossary: b batch, n tokens, t tokens of one expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packed_linear import Pack, packed_product

TEXT_EXPERT = 0


@dataclass
class Routing:
    """(expert, Int['t'] indices into the flattened b * n tokens) pairs covering every token
    exactly once; an index of None means every token."""
    groups: list[tuple[int, Tensor | None]]

    @classmethod
    def single(cls, expert: int) -> 'Routing':
        return cls([(expert, None)])


class ExpertLinear(nn.Module):
    """One nn.Linear per expert; tokens go through the weights of their expert only."""

    def __init__(self, dim_in: int, dim_out: int, experts: int, bias: bool = True):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(dim_in, dim_out, bias = bias) for _ in range(experts)])

    def forward(self, x: Tensor, routing: Routing | None) -> Tensor:
        """Float['b n i'] -> Float['b n o']. Experts no token uses still get a (zero) gradient."""
        if routing is None:
            routing = Routing.single(TEXT_EXPERT)
        if len(routing.groups) == 1 and routing.groups[0][1] is None:
            out = run_linear(self.experts[routing.groups[0][0]], x)
        else:
            flat = x.reshape(-1, x.shape[-1])
            parts = [(index, run_linear(self.experts[expert], flat[index])) for expert, index in routing.groups]
            # in the products' dtype (bf16 under autocast, as one nn.Linear's output), not x's
            out = parts[0][1].new_zeros(flat.shape[0], self.experts[0].out_features)
            for index, part in parts:
                out = out.index_copy(0, index, part)
            out = out.reshape(*x.shape[:-1], -1)
        anchor = self.unused_anchor({expert for expert, _ in routing.groups})
        return out if anchor is None else out + anchor.to(out.dtype)

    def unused_anchor(self, used: set[int]) -> Tensor | None:
        """Zero that depends on the experts no token used, so that every parameter gets a gradient
        (DDP without find_unused_parameters). It is taken here, inside the block, because FSDP2
        gathers a block's weights only while the block runs."""
        unused = [p for e, layer in enumerate(self.experts) if e not in used for p in layer.parameters() if p.requires_grad]
        if not unused or not torch.is_grad_enabled():
            return None
        return sum(0. * p.sum() for p in unused)


def linear(dim_in: int, dim_out: int, experts: int, bias: bool = True) -> nn.Module:
    """A plain nn.Linear with one expert (so checkpoints keep their usual names), else experts."""
    return nn.Linear(dim_in, dim_out, bias = bias) if experts == 1 else ExpertLinear(dim_in, dim_out, experts, bias)


def apply(layer: nn.Module, x: Tensor, routing: Routing | None, pack: Pack | None = None) -> Tensor:
    """layer(x) for one expert or several; pack: the weight packed by MKL (single expert only)."""
    return layer(x, routing) if isinstance(layer, ExpertLinear) else run_linear(layer, x, pack)


def run_linear(layer: nn.Linear, x: Tensor, pack: Pack | None = None) -> Tensor:
    """layer(x), with the bias added apart from the product when compiled for a CPU; by the
    weight's MKL pack where one is given (packed_linear.py).

    There Inductor keeps the fused addmm, which first copies the broadcast bias into the output
    and then accumulates the product onto it. In the compiled 64-token modality step on 2 cores
    the feed-forward's 256 -> 1364 addmm took 190 us plus a 45 us copy of the bias (profiler),
    where the product alone takes 165 us; added apart, the bias joins the element-wise kernel
    that follows (a whole 30-evaluation call ~4% faster in fp32). Under bf16 autocast addmm
    costs 12 to 17 us more than mm at these shapes; the product is then rounded to bf16 before
    the fp32 bias is added (autocast_weights leaves biases in fp32 on CPU). On GPUs Inductor
    unfuses such adds itself, except in half precision: there the fused form stays."""
    if pack is not None:
        out = packed_product(layer, x, pack)
        return out if layer.bias is None else out + layer.bias
    if layer.bias is not None and torch.compiler.is_compiling() and x.device.type == 'cpu':
        out = F.linear(x, layer.weight)
        return (out + layer.bias).to(out.dtype)    # under autocast: the product's dtype, as layer(x)
    return layer(x)

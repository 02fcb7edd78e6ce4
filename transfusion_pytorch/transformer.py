"""The shared transformer: pre-norm blocks of attention and a gated feed-forward.

Mask-, text- and modality-agnostic: it maps token embeddings Float['b n d'] to normalised hidden
states, given rotary angles, an `AttentionMask`, optionally per-token norm modulation (used for
adaptive time conditioning of latent tokens) and optionally a static KV cache.

RMSNorm keeps its gain as an offset from one (weight = 1 + g, g initialised to zero), so weight
decay pulls the norm toward the identity rather than toward zero.

Glossary: b batch, n tokens, d model dim, f feed-forward hidden width.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .compiling import compile_region, shared_code
from . import experts as experts_module
from .config import TransformerConfig
from .debug import typechecked
from .experts import Routing
from .masks import AttentionMask
from .packed_linear import BlockPacks
from .positions import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:], weight = 1 + self.gain)


class FeedForward(nn.Module):
    """SwiGLU: Float['b n d'] -> Float['b n d'] through a gated hidden layer of width f.
    pad_multiple: compute with f padded by zero units to a multiple of this (one expert only)."""

    def __init__(self, dim: int, dim_hidden: int, dropout: float = 0., experts: int = 1, pad_multiple: int = 1):
        super().__init__()
        self.to_hidden = experts_module.linear(dim, 2 * dim_hidden, experts)
        self.dropout = nn.Dropout(dropout)
        self.to_out = experts_module.linear(dim_hidden, dim, experts)
        self.pad = -dim_hidden % pad_multiple if experts == 1 else 0

    def forward(self, x: Tensor, routing: Routing | None = None, packs: BlockPacks | None = None) -> Tensor:
        """packs: the block's MKL-packed weights (packed_linear.py), or None."""
        if self.pad:
            return self._padded(x)
        packs = packs or BlockPacks()
        hidden, gate = experts_module.apply(self.to_hidden, x, routing, packs.ff_in).chunk(2, dim = -1)
        return experts_module.apply(self.to_out, self.dropout(hidden * F.silu(gate)), routing, packs.ff_out)

    def _padded(self, x: Tensor) -> Tensor:
        """The same function with `pad` extra hidden units whose weights and biases are zero:
        they output silu(0) * 0 = 0 and, fed through zero columns of to_out, add nothing; their
        weights are views of padding, so no parameter changes shape or gets a gradient there."""
        pad_rows = lambda t: rearrange(F.pad(rearrange(t, '(two f) ... -> two f ...', two = 2),
                                             (0, 0) * (t.ndim - 1) + (0, self.pad)), 'two f ... -> (two f) ...')
        hidden, gate = F.linear(x, pad_rows(self.to_hidden.weight), pad_rows(self.to_hidden.bias)).chunk(2, dim = -1)
        return F.linear(self.dropout(hidden * F.silu(gate)), F.pad(self.to_out.weight, (0, self.pad)), self.to_out.bias)


@dataclass
class Modulation:
    """Per-token adaptive-norm parameters for one block, each Float['b n d']; zero for tokens
    that are not modulated (text), which leaves them exactly unchanged."""
    attn_scale: Tensor
    attn_shift: Tensor
    attn_gate: Tensor
    ff_scale: Tensor
    ff_shift: Tensor
    ff_gate: Tensor


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, is_first: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim)
        self.attn = Attention(
            config.dim, config.heads, config.dim_head, dropout = config.dropout, qk_norm = config.qk_norm,
            value_residual = config.value_residual and not is_first, laser = config.laser, experts = config.experts,
        )
        self.ff_norm = RMSNorm(config.dim)
        self.ff = FeedForward(config.dim, config.dim_ff, dropout = config.dropout, experts = config.experts,
                              pad_multiple = config.ff_pad_multiple)

    def forward(
        self,
        x: Tensor,
        rotary: tuple[Tensor, Tensor],
        mask: AttentionMask,
        first_values: Tensor | None = None,
        modulation: Modulation | None = None,
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
        routing: Routing | None = None,
        packs: BlockPacks | None = None,
    ) -> tuple[Tensor, Tensor]:
        normed = self.attn_norm(x)
        if modulation is not None:
            normed = normed * (1 + modulation.attn_scale) + modulation.attn_shift
        attn_out, values = self.attn(normed, rotary, mask, first_values = first_values, cache = cache, routing = routing, packs = packs)
        if modulation is not None:
            attn_out = attn_out * (1 + modulation.attn_gate)
        x = x + attn_out

        normed = self.ff_norm(x)
        if modulation is not None:
            normed = normed * (1 + modulation.ff_scale) + modulation.ff_shift
        ff_out = self.ff(normed, routing, packs)
        if modulation is not None:
            ff_out = ff_out * (1 + modulation.ff_gate)
        return x + ff_out, values


class SkipMerge(nn.Module):
    """U-ViT long skip: concatenate and project back, initialised to pass x through unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim, bias = False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dim = self.proj.out_features
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.proj(torch.cat((x, skip), dim = -1))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.dim_head, config.rotary_theta)
        self.blocks = nn.ModuleList([Block(config, is_first = i == 0) for i in range(config.depth)])
        self.skip_merges = nn.ModuleList([SkipMerge(config.dim) for _ in range(config.depth // 2)]) if config.unet_skips else None
        self.final_norm = RMSNorm(config.dim)
        self._compiled_blocks = None
        self._compiled_stack = None

    def __getstate__(self) -> dict:
        """Compiled callables are a per-process cache: pickling (torch.save of the whole module,
        deepcopy as in AveragedModel) leaves them out and the copy compiles its own."""
        return {**super().__getstate__(), '_compiled_blocks': None, '_compiled_stack': None}

    def _block_callables(self, compiled: bool) -> list:
        if not compiled:
            return list(self.blocks)
        if self._compiled_blocks is None:
            # the module compiled (its hooks, and wrappers such as activation checkpointing, run
            # as they are), so the versions stay on Block.forward's code, shared by every model in
            # the process: binding a per-configuration copy as each block's forward instead put
            # blocks in reference cycles and changed what the decode step's guards saw
            self._compiled_blocks = [compile_region(block, self.config.compile_options_dict) for block in self.blocks]
        return self._compiled_blocks

    @typechecked
    def forward(
        self,
        x: Float[Tensor, 'b n d'],
        positions: Int[Tensor, '#b n *k'],
        mask: AttentionMask,
        modulations: list[Modulation] | None = None,
        cache: list[tuple[Tensor, Tensor, Tensor]] | None = None,
        compiled: bool = True,
        routing: Routing | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        packs: list[BlockPacks] | None = None,
    ) -> Float[Tensor, 'b n d']:
        """x: Float['b n d'] embeddings; positions: Int['b n'] or Int['1 n'] rotary positions.
        modulations: one per block, or None. cache: per block (keys, values, write_positions)
        of a static KV cache, or None. compiled: use the compiled blocks (or stack) when
        compile_blocks is on (False inside a region compiled as a whole, and on the uncompiled
        reference paths). routing: the expert of each token when the config has several
        experts (None: expert 0). rotary: self.rotary(positions) computed beforehand, for steps
        repeated at the same positions (ODE evaluations); None computes it here. packs: per
        block, its weights packed by MKL for these rows (packed_linear.py), or None; used only
        uncompiled here (inside a region that compiles them itself, the ODE evaluation). Returns
        Float['b n d'] after the final norm."""
        compiled = compiled and self.config.compile_blocks
        if compiled and self.config.compile_stack:
            if self._compiled_stack is None:
                # its versions kept per transformer configuration (compiling.shared_code)
                run_stack = types.MethodType(shared_code(Transformer._run_stack, self.config), self)
                self._compiled_stack = compile_region(run_stack, self.config.compile_options_dict)
            return self._compiled_stack(x, positions, mask, modulations, cache, routing, rotary, None, compiled_blocks = False)
        return self._run_stack(x, positions, mask, modulations, cache, routing, rotary, None if compiled else packs, compiled_blocks = compiled)

    def _run_stack(self, x: Tensor, positions: Tensor, mask: AttentionMask, modulations: list[Modulation] | None,
                   cache: list | None, routing: Routing | None, rotary: tuple[Tensor, Tensor] | None,
                   packs: list[BlockPacks] | None, compiled_blocks: bool) -> Tensor:
        """The blocks and the final norm; what compile_stack compiles as one region."""
        if rotary is None:
            rotary = self.rotary(positions)
        blocks = self._block_callables(compiled_blocks)
        first_values, skips = None, []
        use_checkpoint = self.config.checkpoint_activations and self.training and torch.is_grad_enabled()
        for index, block in enumerate(blocks):
            if self.skip_merges is not None and index >= len(blocks) // 2:
                x = self.skip_merges[index - len(blocks) // 2](x, skips.pop())
            modulation = modulations[index] if modulations is not None else None
            layer_cache = cache[index] if cache is not None else None
            if use_checkpoint:
                x, values = checkpoint(block, x, rotary, mask, first_values, modulation, layer_cache, routing, use_reentrant = False)
            else:
                x, values = block(x, rotary, mask, first_values, modulation, layer_cache, routing,
                                  packs[index] if packs is not None else None)
            if self.skip_merges is not None and index < len(blocks) // 2:
                skips.append(x)
            if index == 0 and self.config.value_residual:
                first_values = values
        return self.final_norm(x)

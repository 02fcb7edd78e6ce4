"""Multi-head attention with two backends behind one interface.

The backend follows the mask: an `AttentionMask` with a BlockMask runs flex attention, one with
a dense boolean mask (or plain causal) runs PyTorch's scaled_dot_product_attention. The mask is
built once per batch by `masks.py`; this module knows nothing of samples or modalities.

Options (each off by default): query/key RMSNorm; value residual learning (Zhou et al. 2024,
"Value Residual Learning"): every layer after the first mixes in the first layer's values with a
learned per-head gate; LASER (Duvvuri & Dhillon 2024): attend to exp(V) and take the log.

Glossary: b batch, h heads, n tokens (queries), k keys, e head dim, d model dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from . import experts as experts_module
from .compiling import compile_region
from .experts import Routing
from .masks import AttentionMask
from .packed_linear import BlockPacks
from .positions import apply_rotary

_compiled_flex_attention: dict[bool, object] = {}   # static shapes or not -> flex_attention compiled


def run_flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """flex_attention is only fast compiled; compile it once per process, lazily. Shapes are
    left to torch.compile's automatic dynamic: a second sequence length compiles a kernel for
    any length, where static shapes recompiled per length until the recompile limit, after
    which every call ran unfused (all n x n scores). Except on CPU with a score_mod (ALiBi):
    there Inductor's C++ flex kernel with dynamic shapes failed to compile (torch 2.13,
    "'cur_qSplitSize5' was not declared"), so each length compiles its own (token_layout.flex_padding
    rounds those lengths up to a power-of-two number of tiles, to stay under the recompile limit).
    Every model in the process adds its versions to flex_attention's one code object (another
    head count, head size or score_mod compiles anew): with torch's default limit of 8, the
    ninth flex model with ALiBi on CPU ran unfused, so the region has compile_region's room."""
    static = q.device.type == 'cpu' and mask.score_mod is not None
    if q.device.type == 'cpu':
        # compiled on CPU (torch 2.13), flex attention computed wrong outputs when it got a value
        # tensor that is a strided view (heads split off a fused projection) and queries computed
        # in the same graph: max error 4.3 on unit-variance inputs. Contiguous inputs are right.
        # CPU flex runs forward only, so the copies cost little where it runs at all.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod = mask.score_mod, block_mask = mask.block)
    if static not in _compiled_flex_attention:
        _compiled_flex_attention[static] = compile_region(flex_attention, None, dynamic = False if static else None)
    return _compiled_flex_attention[static](q, k, v, score_mod = mask.score_mod, block_mask = mask.block)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Float['b h n e'] queries against Float['b h k e'] keys and values under `mask`."""
    if mask.uses_flex:
        return run_flex_attention(q, k, v, mask)
    attn_mask = mask.dense
    if mask.bias is not None:
        attn_mask = mask.bias.to(q.dtype).masked_fill(~mask.dense, float('-inf'))
    return F.scaled_dot_product_attention(q, k, v, attn_mask = attn_mask, is_causal = mask.is_causal)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dim with a per-head gain offset (weight = 1 + g)."""

    def __init__(self, heads: int, dim_head: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(heads, 1, dim_head))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:]) * (1 + self.gain)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.,
        qk_norm: bool = False,
        value_residual: bool = False,
        laser: bool = False,
        experts: int = 1,
    ):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.laser = laser
        dim_inner = heads * dim_head
        self.to_qkv = experts_module.linear(dim, 3 * dim_inner, experts, bias = False)
        self.to_out = experts_module.linear(dim_inner, dim, experts, bias = False)
        self.q_norm = HeadRMSNorm(heads, dim_head) if qk_norm else None
        self.k_norm = HeadRMSNorm(heads, dim_head) if qk_norm else None
        # gate in (0, 1) per token and head for mixing the first layer's values in
        self.to_value_mix = nn.Linear(dim, heads) if value_residual else None

    def forward(
        self,
        x: Tensor,
        rotary: tuple[Tensor, Tensor],
        mask: AttentionMask,
        first_values: Tensor | None = None,
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
        routing: Routing | None = None,
        packs: BlockPacks | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x: Float['b n d']. rotary: (cos, sin) for the n tokens.
        first_values: the first layer's values Float['b h n e'] (value residual learning).
        cache: (keys, values, write_positions): keys and values Float['b h k e'] of a static
            KV cache (or a view of its first k slots), updated in place at write_positions
            Int['b n']; attention then runs over all k slots and `mask` must hide those not
            yet written.
        routing: which expert projections each token uses (mixture of experts by modality).
        packs: the block's MKL-packed weights (packed_linear.py), or None.
        Returns the output Float['b n d'] and this layer's values (for value residual learning).
        """
        packs = packs or BlockPacks()
        qkv = experts_module.apply(self.to_qkv, x, routing, packs.qkv)
        q, k, v = rearrange(qkv, 'b n (three h e) -> three b h n e', three = 3, h = self.heads)
        if self.to_value_mix is not None and first_values is not None:
            mix = rearrange(self.to_value_mix(x).sigmoid(), 'b n h -> b h n 1')
            v = v.lerp(first_values, mix)
        values = v
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if torch.compiler.is_compiling():
            # each rotation fuses with its read of the projection; a stack would first copy q and
            # k out (compiled CPU text step, 4 x 512 tokens: its rotary kernels 6.9 -> 3.9-4.5 ms a step)
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        else:
            q, k = apply_rotary(torch.stack((q, k)), *rotary).unbind(0)   # eager: one rotation's kernels for both

        if cache is not None:
            k, v = write_to_cache(cache, k, v)

        if mask.segments is not None:       # one row per sample: no scores across samples
            q, k, v = (mask.segments.gather(t) for t in (q, k, v))
        out = laser_attend(q, k, v, mask) if self.laser else attend(q, k, v, mask)
        if mask.segments is not None:
            out = mask.segments.scatter(out)
        # dropout on the heads' output, not on the attention weights: flex attention has no
        # dropout of its weights, and the same config must train the same model on every backend
        out = F.dropout(rearrange(out, 'b h n e -> b n (h e)'), self.dropout, self.training)
        return experts_module.apply(self.to_out, out, routing, packs.attn_out), values


def write_to_cache(cache: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write new keys/values Float['b h n e'] into the static cache at positions Int['b n'] (per
    row), or Int['n'] (shared by all rows, a cheaper index copy)."""
    cache_keys, cache_values, positions = cache
    if positions.ndim == 1:
        cache_keys.index_copy_(2, positions, k.to(cache_keys.dtype))
        cache_values.index_copy_(2, positions, v.to(cache_values.dtype))
    else:
        # an index put, not scatter_: compiled, scatter_ into a graph input copied the whole
        # cache per layer and step (1 ms per tensor at 8 x 1536 slots on CPU); this writes in place
        rows = torch.arange(k.shape[0], device = k.device)[:, None]
        cache_keys[rows, :, positions] = rearrange(k, 'b h n e -> b n h e').to(cache_keys.dtype)        # indexed: (b, n, h, e)
        cache_values[rows, :, positions] = rearrange(v, 'b h n e -> b n h e').to(cache_values.dtype)
    return cache_keys, cache_values


def laser_attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """log(attention(exp(V))), stabilised by each value channel's max m over one sample's keys.

    m cancels in exact arithmetic and is detached, so no gradient flows through it; in floating
    point the output depends on it through rounding (about 1e-7 relative). m is taken per
    sample (a row of the dense backend or of a text-only batch; a document of the packed flex
    row, padding apart), so other samples never enter, but later tokens of the same sample do
    (as in the paper's formulation, which takes the max over the sequence): a channel whose
    values span more than about 80 within a sample underflows for queries that see only its
    low end."""
    if mask.document is not None:
        v_max = document_max(v, mask.document).detach()             # (b, h, n, e): the key's sample's max
        out = attend(q, k, (v - v_max).exp(), mask)
        return out.clamp(min = torch.finfo(out.dtype).tiny).log() + v_max   # queries share their keys' samples
    key_visible = None
    if mask.dense is not None:
        key_visible = rearrange(mask.dense.any(dim = -2), 'b 1 k -> b 1 k 1')
    visible_v = v if key_visible is None else v.masked_fill(~key_visible, float('-inf'))
    v_max = visible_v.amax(dim = -2, keepdim = True).detach()      # (b, h, 1, e)
    exp_v = (visible_v - v_max).exp()                                # hidden slots become exactly 0
    out = attend(q, k, exp_v, mask)
    return out.clamp(min = torch.finfo(out.dtype).tiny).log() + v_max


def document_max(v: Tensor, document: Tensor) -> Tensor:
    """Each token's sample's max of Float['b h n e'] over the sample's tokens (document Int['n'],
    padding -1 forming its own group), broadcast back to Float['b h n e']."""
    group = (document + 1)[None, None, :, None].expand_as(v)                 # padding -> 0
    # ids are below n: n + 1 groups cover them without reading the largest back to the host
    maxima = v.new_full((*v.shape[:2], v.shape[2] + 1, v.shape[-1]), float('-inf'))
    maxima = maxima.scatter_reduce(2, group, v, reduce = 'amax')
    return maxima.gather(2, group)

"""The attention rule as data, and its renderings for the two attention backends.

Rule (the README's first paragraph): query token q may attend key token k iff they belong to the same
sample and (k <= q, or q and k are latent tokens of the same modality instance). Begin, shape
and end tokens are text-like (causal). Two variants, both per token:

- isolated latent tokens (an instance trained or sampled without its conditioning, for
  classifier-free guidance) see only their own instance;
- `bidirectional_instances=False` makes attention inside an instance causal (the paper's
  ablation).

The rule is written once, as `AttentionRule.allows(q, k)` on index tensors. Broadcast over
`arange(n)` it gives the dense boolean mask for SDPA; called by flex attention as a
`mask_mod` it gives the BlockMask. Both are built once per batch and shared by every layer.

Glossary for shapes: b batch, h heads, n tokens, q queries, k keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .constants import ConstantTables


FLEX_BLOCK = 128  # flex attention's default tile: packed sequences are padded to a multiple of it


@dataclass
class AttentionMask:
    """What one attention call needs; one of is_causal / dense / block is set, or none for full
    attention.

    is_causal: plain causal attention (SDPA's fused path, or a causal BlockMask).
    dense: Bool['b|1 1 q k'] for SDPA.
    block: a flex BlockMask.
    bias: Float['b|1 h q k'] added to the scores of visible pairs (dense backend: ALiBi).
    score_mod: the same bias for flex attention.
    segments: attend sample by sample (dense backend): queries, keys and values of the packed
        sequence are gathered into one padded row per sample, and `dense`/`bias` describe those
        rows. A packed batch of b samples then costs b * L^2 scores instead of (b * L)^2.
    document: with a BlockMask over a packed row, each token's sample Int['n'] (padding -1):
        what per-sample statistics (LASER's value shift) need, since the row mixes samples.
    """
    is_causal: bool = False
    dense: Tensor | None = None
    block: BlockMask | None = None
    bias: Tensor | None = None
    score_mod: object = None
    segments: 'Segments | None' = None
    document: Tensor | None = None

    @property
    def uses_flex(self) -> bool:
        return self.block is not None


@dataclass
class Segments:
    """index: Int['b L'] packed position of each slot of each sample's row (padding repeats the
    sample's first token); keep: Int['n'] flat row slots holding real tokens, in packed order;
    source: Int['b L'] flattened, the packed position of each slot, n for padding.

    Autograd's backward of an index is a scatter-add, which compiled CPU code runs with an atomic
    add per element (5.7 ms per layer in a CPU mixed training step of 4 x 416 tokens, against
    1.3-1.5 ms for the gathers, profiler). Both directions here
    backpropagate by gathers instead (`_SelectMovingBack`): every real token has one slot, and
    padding slots get exactly zero gradient, since scatter drops their outputs and no real query
    sees them."""
    index: Tensor
    keep: Tensor
    source: Tensor

    @classmethod
    def from_slices(cls, slices: list[tuple[int, int]], device) -> 'Segments':
        width, length = max(b - a for a, b in slices), slices[-1][1]
        index = [[a + j if a + j < b else a for j in range(width)] for a, b in slices]
        keep = [row * width + j for row, (a, b) in enumerate(slices) for j in range(b - a)]
        source = [a + j if a + j < b else length for a, b in slices for j in range(width)]
        return cls(*(torch.tensor(t, device = device) for t in (index, keep, source)))

    @property
    def valid(self) -> Tensor:
        """Bool['b L'] slots that hold a real token."""
        flags = torch.zeros(self.index.numel(), dtype = torch.bool, device = self.index.device)
        return flags.index_fill(0, self.keep, True).reshape(self.index.shape)

    def gather(self, x: Tensor) -> Tensor:
        """Float['1 h n e'] packed -> Float['b h L e'] one row per sample."""
        rows = _SelectMovingBack.apply(x[0], self.index.reshape(-1), self.keep, False)
        return rearrange(rows, 'h (b l) e -> b h l e', b = self.index.shape[0])

    def scatter(self, x: Tensor) -> Tensor:
        """Float['b h L e'] rows -> Float['1 h n e'] packed."""
        return _SelectMovingBack.apply(rearrange(x, 'b h l e -> h (b l) e'), self.keep, self.source, True)[None]


class _SelectMovingBack(torch.autograd.Function):
    """x.index_select(1, index) for Float['h m e'] -> Float['h s e'], whose gradient moves back
    by a gather too: `back` Int['m'] gives the output position each input row's gradient comes
    from, or s (past the end, only with `zero_past_end`) for a zero gradient. Exact when every
    input row is read at most once apart from reads whose gradient is zero (Segments' padding).
    Its context is set apart from the forward, so torch.func transforms (grad, vmap) take it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, index: Tensor, back: Tensor, zero_past_end: bool) -> Tensor:
        return x.index_select(1, index)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        _, _, back, ctx.zero_past_end = inputs
        ctx.save_for_backward(back)

    @staticmethod
    def backward(ctx, grad: Tensor):
        back, = ctx.saved_tensors
        if ctx.zero_past_end:
            grad = torch.cat((grad, grad.new_zeros(grad.shape[0], 1, grad.shape[2])), dim = 1)
        return grad.index_select(1, back), None, None, None


class AttentionRule:
    """Per-token tensors of one packed sequence, all (n,):

    document: which sample a token belongs to.
    instance: modality-instance id of a latent token, -1 for text-like tokens.
    isolated: latent tokens that may see only their own instance (or None: none are).
    coords, alibi_slopes: for N-d ALiBi inside instances, each latent token's grid coordinates
        Int['n a'] and one slope per head Float['h'] (0 for heads without ALiBi).
    """

    def __init__(self, document: Tensor, instance: Tensor, isolated: Tensor | None = None, bidirectional_instances: bool = True,
                 coords: Tensor | None = None, alibi_slopes: Tensor | None = None):
        self.document = document
        self.instance = instance
        self.isolated = isolated
        self.bidirectional_instances = bidirectional_instances
        self.coords = coords
        self.alibi_slopes = alibi_slopes

    @property
    def has_alibi(self) -> bool:
        return self.alibi_slopes is not None

    def alibi(self, head: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """ALiBi bias -slope[head] * |coords[q] - coords[k]| (Euclidean, on the instance's own grid)
        for two latent tokens of one instance, 0 otherwise; arguments broadcast."""
        same_instance = (self.instance[q] == self.instance[k]) & (self.instance[q] >= 0)
        squared = sum((self.coords[q, a] - self.coords[k, a]).float() ** 2 for a in range(self.coords.shape[1]))
        return -self.alibi_slopes[head] * squared.sqrt() * same_instance

    @property
    def score_mod(self):
        """ALiBi as a flex-attention score_mod (a plain function: flex counts its arguments)."""
        def alibi_score_mod(score, batch, head, q, k):
            return score + self.alibi(head, q, k)
        return alibi_score_mod

    def dense_bias(self, kv_length: int | None = None) -> Tensor:
        """Float['h q k'] ALiBi bias for the whole sequence (keys padded to kv_length)."""
        index = torch.arange(self.length, device = self.document.device)
        head = torch.arange(self.alibi_slopes.shape[0], device = index.device)
        bias = self.alibi(head[:, None, None], index[None, :, None], index[None, None, :])
        if kv_length is not None and kv_length > self.length:
            bias = torch.nn.functional.pad(bias, (0, kv_length - self.length))
        return bias

    @property
    def length(self) -> int:
        return self.document.shape[0]

    def allows(self, q: Tensor, k: Tensor) -> Tensor:
        """Whether query index q may attend key index k; q and k broadcast against each other."""
        same_document = self.document[q] == self.document[k]
        same_instance = (self.instance[q] == self.instance[k]) & (self.instance[q] >= 0)
        visible = k <= q
        if self.bidirectional_instances:
            visible = visible | same_instance
        if self.isolated is not None:
            visible = visible & (~self.isolated[q] | same_instance)
        return same_document & visible

    @property
    def mask_mod(self):
        """The rule as a flex-attention mask_mod (a plain function: flex counts its arguments)."""
        def rule_mask_mod(batch, head, q, k):
            return self.allows(q, k)
        return rule_mask_mod

    def dense(self, kv_length: int | None = None) -> Tensor:
        """Bool['q k'] for the whole sequence; kv_length > n pads with hidden key slots (a cache)."""
        index = torch.arange(self.length, device = self.document.device)
        allowed = self.allows(index[:, None], index[None, :])
        if kv_length is not None and kv_length > self.length:
            allowed = torch.nn.functional.pad(allowed, (0, kv_length - self.length), value = False)
        return allowed

    def block_mask(self) -> BlockMask:
        """The rule as a BlockMask, classified tile by tile (empty, partial, full) from per-tile
        summaries (document and instance ranges): O(tiles^2) work on the device, no compilation,
        no per-batch recompilation (unlike create_block_mask on a new closure every batch) and no
        O(n^2) pass over token pairs. See `_classify_tiles` for why the summaries suffice."""
        partial, full = self._classify_tiles(FLEX_BLOCK)
        # whole tiles (the padded training path) need no explicit lengths, which older torch lacks
        lengths = {} if self.length % FLEX_BLOCK == 0 else dict(seq_lengths = (self.length, self.length))
        return BlockMask.from_kv_blocks(*_tile_lists(partial), *_tile_lists(full), BLOCK_SIZE = FLEX_BLOCK,
                                        mask_mod = self.mask_mod, **lengths)

    def _classify_tiles(self, tile: int) -> tuple[Tensor, Tensor]:
        """(partial, full): Bool['qt kt'] per pair of query and key tiles.

        Each tile is summarised by the range of its document ids and of its instance ids. Two
        tiles that share a document (or an instance) have overlapping ranges, so a pair is
        - kept (partial or full) when it is on the diagonal (a token sees itself), or the key
          tile comes first and the document ranges overlap, or (bidirectional) the instance
          ranges overlap: every pair of tiles holding an allowed pair of tokens is kept;
        - full only when one document spans both tiles and either the key tile comes first and
          no query is isolated, or (bidirectional) one instance spans both tiles: every pair of
          tokens is then allowed.
        Where the ranges say more than the ids (isolated queries, ids out of order) a pair is
        only kept as partial when it could be dropped or marked full: that costs speed, never
        correctness, since flex applies the rule inside partial tiles. Packing numbers
        documents and instances in order of position, so the ranges are tight. Tokens past the
        end (n not a multiple of the tile) repeat the last token, which adds no id to its tile."""
        n, device = self.length, self.document.device
        tiles = -(-n // tile)
        token = torch.arange(tiles * tile, device = device).clamp(max = n - 1)
        by_tile = lambda values: rearrange(values[token], '(t i) -> t i', i = tile)
        document = by_tile(torch.where(self.document >= 0, self.document, self.document.max() + 1))   # padding: a last document
        instance = by_tile(self.instance)
        latent = instance >= 0
        big = torch.iinfo(instance.dtype).max
        doc_low, doc_high = document.amin(dim = 1), document.amax(dim = 1)                           # (t,)
        inst_low = torch.where(latent, instance, big).amin(dim = 1)
        inst_high = torch.where(latent, instance, -1).amax(dim = 1)                                  # no latents: empty range
        q, k = (lambda x: x[:, None]), (lambda x: x[None, :])
        index = torch.arange(tiles, device = device)
        diagonal, key_first = q(index) == k(index), k(index) < q(index)
        share_document = (k(doc_low) <= q(doc_high)) & (q(doc_low) <= k(doc_high))
        share_instance = (k(inst_low) <= q(inst_high)) & (q(inst_low) <= k(inst_high))
        one_document = q(doc_low == doc_high) & k(doc_low == doc_high) & (q(doc_low) == k(doc_low))
        one_instance = latent.all(dim = 1) & (inst_low == inst_high)
        one_instance = q(one_instance) & k(one_instance) & (q(inst_low) == k(inst_low))
        isolated = by_tile(self.isolated).any(dim = 1) if self.isolated is not None else torch.zeros_like(diagonal[0])
        nonempty = diagonal | (key_first & share_document)
        full = one_document & key_first & ~q(isolated)
        if self.bidirectional_instances:
            nonempty = nonempty | share_instance
            full = full | one_instance
        return nonempty & ~full, full


def _tile_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Bool['qt kt'] -> (count Int['1 1 qt'], indices Int['1 1 qt kt']) of the True key tiles
    per query tile, listed first, as BlockMask.from_kv_blocks expects."""
    count = flags.sum(dim = -1, dtype = torch.int32)
    order = flags.to(torch.int8).argsort(dim = -1, descending = True, stable = True).to(torch.int32)
    return count[None, None], order[None, None]


def causal_block_mask(length: int, device: torch.device) -> BlockMask:
    def causal(batch, head, q, k):
        return k <= q
    return create_block_mask(causal, B = None, H = None, Q_LEN = length, KV_LEN = length, device = device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' is flex attention on CUDA and SDPA elsewhere (measured faster on CPU)."""
    if backend == 'auto':
        return 'flex' if device.type == 'cuda' else 'sdpa'
    return backend


def mask_for_rule(rule: AttentionRule, backend: str, kv_length: int | None = None,
                  sample_slices: list[tuple[int, int]] | None = None) -> AttentionMask:
    """Render `rule` for one packed sequence (batch of one) with the chosen backend. kv_length:
    keys are the slots of a longer cache (dense only). sample_slices: where the samples lie;
    with several, the dense backend attends sample by sample (no scores across samples)."""
    if kv_length is None and resolve_backend(backend, rule.document.device) == 'flex':
        return AttentionMask(block = rule.block_mask(), score_mod = rule.score_mod if rule.has_alibi else None, document = rule.document)
    if kv_length is None and sample_slices is not None and len(sample_slices) > 1:
        return segmented_mask(rule, Segments.from_slices(sample_slices, rule.document.device))
    bias = rule.dense_bias(kv_length)[None] if rule.has_alibi else None
    return AttentionMask(dense = rule.dense(kv_length)[None, None], bias = bias)


def segmented_mask(rule: AttentionRule, segments: Segments) -> AttentionMask:
    """The rule on one padded row per sample: Bool['b 1 L L']; padding slots see only themselves
    (no empty rows) and are never seen."""
    q, k = segments.index[:, :, None], segments.index[:, None, :]
    valid = segments.valid
    width = valid.shape[1]
    allowed = rule.allows(q, k) & valid[:, None, :]
    allowed = allowed | (~valid[:, :, None] & torch.eye(width, dtype = torch.bool, device = valid.device))
    bias = None
    if rule.has_alibi:
        head = torch.arange(rule.alibi_slopes.shape[0], device = valid.device)[None, :, None, None]
        bias = rule.alibi(head, q[:, None], k[:, None])
    return AttentionMask(dense = allowed[:, None], bias = bias, segments = segments)


def alibi_slopes(heads: int, alibi_heads: int, device: torch.device | None = None) -> Tensor:
    """Float['h'] slopes: the first alibi_heads heads get ALiBi's geometric slopes
    2^(-8 i / alibi_heads), i = 1..alibi_heads (Press et al. 2022); the others 0."""
    slopes = torch.zeros(heads, dtype = torch.float32, device = device)
    if alibi_heads:
        slopes[:alibi_heads] = 2. ** (-8. * torch.arange(1, alibi_heads + 1, device = device) / alibi_heads)
    return slopes


class AlibiSlopes(ConstantTables):
    """`slopes`, alibi_slopes(heads, alibi_heads) as an fp32 table: a cast of the model would
    round slopes that are not powers of two, and `to_empty` would leave them uninitialised."""

    def __init__(self, heads: int, alibi_heads: int):
        super().__init__()
        self.heads, self.alibi_heads = heads, alibi_heads
        self.register_tables()

    def tables(self, device) -> dict[str, Tensor]:
        return dict(slopes = alibi_slopes(self.heads, self.alibi_heads, device))


def instance_alibi(coords: Tensor, slopes: Tensor) -> Tensor:
    """Float['h n n'] ALiBi bias among the n tokens of one instance with coords Int['n a']."""
    return -slopes[:, None, None] * torch.cdist(coords.float(), coords.float())[None]


def causal_mask(length: int, device: torch.device, backend: str) -> AttentionMask:
    """Plain causal attention over equal-length rows (text-only training). 'auto' takes SDPA's
    fused causal kernels (FlashAttention on CUDA), which need no mask at all; flex only when
    forced."""
    if backend == 'flex':
        return AttentionMask(block = causal_block_mask(length, device))
    return AttentionMask(is_causal = True)


def prefix_mask(
    starts: Tensor,
    num_new: int,
    kv_length: int,
    bidirectional_span: int = 0,
    isolated: Tensor | None = None,
    instance_bias: Tensor | None = None,
) -> AttentionMask:
    """Mask for decoding `num_new` tokens per row, written at slots starts[b] + (0..num_new-1)
    of a cache of `kv_length` slots, each row its own sample.

    bidirectional_span: the first `bidirectional_span` new tokens form one modality instance and
        see each other; the rest are causal (text, an end token, or the causal ablation with 0).
    isolated: Bool['b'], rows whose new tokens see only the new tokens (the unconditional branch
        of classifier-free guidance).
    instance_bias: Float['h s s'] ALiBi among the first s = bidirectional_span new tokens.
    Returns a dense Bool['b 1 q k'] mask (and bias); slots past a row's tokens stay hidden.
    """
    key = torch.arange(kv_length, device = starts.device)                          # (k,)
    offset = torch.arange(num_new, device = starts.device)                         # (q,)
    last_visible = torch.where(offset < bidirectional_span, max(bidirectional_span - 1, 0), offset)
    limit = starts[:, None] + last_visible                                         # (b, q)
    visible = key[None, None, :] <= limit[:, :, None]                              # (b, q, k)
    if isolated is not None:
        own = key[None, None, :] >= starts[:, None, None]
        visible = visible & (~isolated[:, None, None] | own)
    bias = None
    if instance_bias is not None:
        span = instance_bias.shape[-1]
        offset = key[None, :] - starts[:, None]                                    # (b, k)
        inside = (offset >= 0) & (offset < span)
        bias = instance_bias[:, :, offset.clamp(0, span - 1)]                      # (h, s, b, k)
        bias = rearrange(bias, 'h s b k -> b h s k') * inside[:, None, None]
        bias = torch.nn.functional.pad(bias, (0, 0, 0, num_new - span))            # later queries: none
    return AttentionMask(dense = visible[:, None], bias = bias)

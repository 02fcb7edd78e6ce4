"""Choosing text tokens (temperature, min-p) and text-only generation with a static KV cache.

Min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): keep the tokens whose
probability is at least `min_p` times the most likely token's, then sample from what is left
with the temperature applied (truncation first, so a high temperature cannot promote tokens the
filter removed). temperature = 0 is greedy decoding.

Glossary: b batch, v vocabulary, p prompt length, s cache slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kv_cache import KVCache
from .masks import prefix_mask


def min_p_keep(logits: Tensor, min_p: float) -> Tensor:
    """Bool['b v']: tokens with p >= min_p * p_max under softmax(logits)."""
    probs = logits.float().softmax(dim = -1)
    return probs >= min_p * probs.amax(dim = -1, keepdim = True)


def choose_tokens(
    logits: Tensor,
    temperature: float = 1.,
    min_p: float = 0.1,
    allowed: Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> Tensor:
    """Int['b'] tokens from Float['b v'] logits.

    allowed: Bool['b v'] or Bool['v'], tokens that may be chosen at all (grammar constraints).
    generators: one torch.Generator (or None) per row, so a row's draws do not depend on the
        other rows in the batch; None uses the global generator for all rows.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float('-inf'))
    if temperature == 0:
        return logits.argmax(dim = -1)
    if min_p > 0:
        logits = logits.masked_fill(~min_p_keep(logits, min_p), float('-inf'))
    probs = (logits / temperature).softmax(dim = -1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(row[None], 1, generator = g).squeeze(-1) for row, g in zip(probs, generators)])


class TextDecoder:
    """Text-only decoding over a static cache: every step has the same shapes (tokens Int['b 1']
    at positions Int['b']), so the step can be captured by CUDA graphs when compiled."""

    def __init__(self, model, batch: int, slots: int, compile_step: bool = False):
        self.model = model
        self.cache = KVCache.for_model(model, batch, slots)
        self.step = self._step
        if compile_step:
            torch._dynamo.mark_static_address(self.cache.keys)
            torch._dynamo.mark_static_address(self.cache.values)
            self.step = torch.compile(self._step, mode = 'reduce-overhead', fullgraph = True)

    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Feed Int['b q'] tokens written at slots positions[b] + (0..q-1); returns the last
        position's logits Float['b v']."""
        model = self.model
        b, q = tokens.shape
        slots = positions[:, None] + torch.arange(q, device = tokens.device)
        mask = prefix_mask(positions, q, self.cache.slots)
        hidden = model.transformer(model.token_embedding(tokens), slots, mask, cache = self.cache.layer_views(slots))
        return model.to_logits(hidden[:, -1])

    def prefill(self, prompt: Tensor) -> Tensor:
        starts = torch.zeros(prompt.shape[0], dtype = torch.long, device = prompt.device)
        return self._step(prompt, starts)


@torch.no_grad()
def generate_text_only(
    model,
    prompt: Tensor,
    seq_len: int,
    temperature: float = 1.,
    min_p: float = 0.1,
    cache_kv: bool = True,
    compile_step: bool = False,
) -> Tensor:
    """Continue Int['b p'] prompts to seq_len tokens; returns the Int['b (seq_len - p)'] new tokens.
    Only text ids are produced (special tokens are masked out)."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.is_floating_point():
        raise ValueError(f'prompt must be integer token ids of shape (b, p) with p >= 1, got {tuple(prompt.shape)} {prompt.dtype}')
    text_count = model.config.num_text_tokens
    if bool(((prompt < 0) | (prompt >= text_count)).any()):
        raise ValueError(f'prompt ids must lie in [0, num_text_tokens={text_count})')
    prompt = prompt.to(model.device).long()
    b, p = prompt.shape
    if seq_len <= p:
        return prompt.new_zeros((b, 0))
    text_only = torch.zeros(model.vocab.size, dtype = torch.bool, device = model.device)
    text_only[:text_count] = True

    out = torch.empty((b, seq_len), dtype = torch.long, device = model.device)
    out[:, :p] = prompt
    if cache_kv:
        decoder = TextDecoder(model, b, seq_len, compile_step = compile_step)
        logits = decoder.prefill(prompt)
    for position in range(p, seq_len):
        if not cache_kv:
            logits = model.text_logits(out[:, :position])[:, -1]
        token = choose_tokens(logits, temperature, min_p, allowed = text_only)
        out[:, position] = token
        if cache_kv and position + 1 < seq_len:
            positions = torch.full((b,), position, dtype = torch.long, device = model.device)
            logits = decoder.step(token[:, None], positions)
    return out[:, p:]

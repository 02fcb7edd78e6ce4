"""Choosing text tokens (temperature, min-p) and text-only generation with a static KV cache.

Min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): keep the tokens whose
probability is at least `min_p` times the most likely token's, then sample from what is left
with the temperature applied (truncation first, so a high temperature cannot promote tokens the
filter removed). temperature = 0 is greedy decoding.

Glossary: b batch, v vocabulary, p prompt length, s cache slots.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .autocast_weights import weights_cast_once
from .compiling import skip_guard_checks, with_own_code
from .kv_cache import KVCache
from .masks import AttentionMask
from .sampling_options import check_flag, check_text_sampling, is_integer
from .replay import Replayed, recorded_region


def min_p_keep(logits: Tensor, min_p: float) -> Tensor:
    """Bool['b v']: tokens with p >= min_p * p_max under softmax(logits)."""
    probs = logits.float().softmax(dim = -1)
    return probs >= min_p * probs.amax(dim = -1, keepdim = True)


def choose_tokens(
    logits: Tensor,
    temperature: float | Tensor = 1.,
    min_p: float | Tensor = 0.1,
    allowed: Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> Tensor:
    """Int['b'] tokens from Float['b v'] logits, drawn by Gumbel-max (argmax of logits /
    temperature plus Gumbel noise): no host round trip, so it also runs inside a compiled or
    CUDA-graphed decode step.

    temperature, min_p: numbers, or 0-d tensors (a compiled step's buffers) for a temperature > 0.
    allowed: Bool['b v'] or Bool['v'], tokens that may be chosen at all (grammar constraints).
    generators: one torch.Generator (or None) per row, so a row's draws do not depend on the
        other rows in the batch; None draws from the global generator.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float('-inf'))
    if not torch.is_tensor(temperature) and temperature == 0:
        return logits.argmax(dim = -1)
    if torch.is_tensor(min_p) or min_p > 0:
        logits = logits.masked_fill(~min_p_keep(logits, min_p), float('-inf'))
    if generators is None:
        uniform = torch.rand_like(logits)
    else:
        uniform = torch.stack([torch.rand(logits.shape[-1], generator = g, device = logits.device) for g in generators])
    gumbel = -(-uniform.clamp(min = 1e-20).log()).log()
    # the row's max subtracted first: any positive temperature leaves it at 0 and the allowed
    # tokens finite (dividing raw logits by a tiny temperature overflowed to +-inf)
    scaled = (logits - logits.amax(dim = -1, keepdim = True)) / temperature
    # past ~3.4e38 the temperature is inf in fp32 and a masked -inf / inf is NaN, which argmax picks
    scaled = scaled.masked_fill(logits == float('-inf'), float('-inf'))
    return (scaled + gumbel).argmax(dim = -1)


class TextDecoder:
    """Text-only decoding over a static cache. All rows share their positions, so each step
    writes one slot with an index copy and one mask Bool['1 1 q s'] serves every row and layer.

    A step reads the last token and the position from buffers it updates in place, and the
    temperature and min-p from buffers set once per call; it samples the next token inside the
    step and takes one argument, whether it decodes greedily (one compiled version each). Nothing
    changes shape or address between steps, so the compiled step is captured once by CUDA graphs
    (on a GPU) and replayed, on CPU
    its compiled graph is called directly (replay.py), and on any device each token costs one
    call. The LM head computes text logits only."""

    def __init__(self, model, batch: int, slots: int, compile_step: bool = False):
        self.model = model
        self.cache = KVCache.for_model(model, batch, slots)
        self.last_token = torch.zeros((batch, 1), dtype = torch.long, device = model.device)
        self.position = torch.zeros(1, dtype = torch.long, device = model.device)
        # read by the step as values, not constants: a compiled step serves any temperature and min-p
        self.temperature = torch.ones((), device = model.device)
        self.min_p = torch.zeros((), device = model.device)
        self.step = self._step
        self.compiled = compile_step
        self.region = None             # on CPU, the compiled step whose graph a loop calls directly
        self.cast_weights: dict = {}   # autocast-dtype weight copies, at fixed addresses for the CUDA graph
        if compile_step:
            for tensor in [*self.cache.tensors(), self.last_token, self.position, self.temperature, self.min_p]:
                torch._dynamo.mark_static_address(tensor)
            # a step is a few hundred small kernels: on a GPU they replay as one CUDA graph; on CPU
            # a C++ wrapper launches them without the Python one (128 tokens at the CPU benchmark
            # size: 0.107 -> 0.100 s alone, 0.095 s with the guard skipping in `decode_into`)
            if model.device.type == 'cuda':
                self.step = torch.compile(with_own_code(self._step), fullgraph = True, dynamic = False, mode = 'reduce-overhead')
            else:
                self.region = recorded_region(self._step, {'cpp_wrapper': True}, fullgraph = True, dynamic = False)
                self.step = self.region.fn

    def decode_into(self, out: Tensor, start: int, temperature: float, min_p: float) -> None:
        """Write one new token per step into out[:, start:] (Int['b n']), after `prefill`.

        A compiled step checks its guards on every call (96 us of a 0.8 ms token on 2 CPU cores).
        Here only the first call checks them all; the others skip all but the guards that tell
        compiled versions apart (torch.compiler.set_stance(skip_guard_eval_unsafe=True)). On CPU,
        from the third step on, the loop calls the step's compiled graph directly (replay.py),
        past torch.compile's frame, guards and wrappers: 128 tokens at the CPU benchmark size took
        252.0 instead of 307.9 ms (medians of 12 calls alternating in one process). Both are safe
        because nothing the step reads changes between the calls of this loop: the same decoder,
        buffers, model and arguments, only the buffers' values. A new loop (the next call) starts
        over, so replaced weights or another temperature are seen."""
        if start >= out.shape[1]:
            return
        # past float32's range a temperature is inf, as choose_tokens would compute it from a float
        self.temperature.fill_(temperature if temperature <= torch.finfo(self.temperature.dtype).max else float('inf'))
        self.min_p.fill_(min_p)
        greedy = temperature == 0          # a branch, so one of two compiled versions
        step = lambda: self.step(greedy)
        if self.region is not None:
            step = Replayed(step, self.region, self.model.device)
        out[:, start:start + 1] = step()
        with skip_guard_checks() if self.compiled else nullcontext():
            for index in range(start + 1, out.shape[1]):
                out[:, index:index + 1] = step()

    def _step(self, greedy: bool) -> Tensor:
        """Feed the last token at the current position, advance both; returns the new token
        Int['b 1'] (a compiled step's output: copy it before the next step), the most likely or
        drawn at the decoder's temperature and min-p."""
        temperature = 0. if greedy else self.temperature
        token = choose_tokens(self._logits(self.last_token, self.position), temperature, self.min_p)[:, None]
        self.last_token.copy_(token)
        self.position.add_(1)
        return token

    def _logits(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The last position's text logits Float['b t'] after feeding Int['b q'] tokens at
        slots positions Int['q'] (shared by all rows)."""
        model = self.model
        slot = torch.arange(self.cache.slots, device = tokens.device)
        mask = AttentionMask(dense = (slot[None, :] <= positions[:, None])[None, None])   # (1, 1, q, s)
        # one query against a few hundred slots: on CPU the math path (which the compiler fuses)
        # beat the flash kernel, 1006 -> ~1130 tokens/s at the CPU benchmark size; GPUs keep SDPA's choice
        backends = sdpa_kernel([SDPBackend.MATH]) if tokens.device.type == 'cpu' else nullcontext()
        with backends:   # compiled=False: the step is compiled as a whole (or not at all), never block by block
            hidden = model.transformer(model.token_embedding(tokens), positions[None], mask, cache = self.cache.layer_views(positions), compiled = False)
        # the head is read each step: .to(), load_state_dict(assign=True) replace the weight
        return F.linear(hidden[:, -1], model.to_logits.weight[:model.config.num_text_tokens])

    def prefill(self, prompt: Tensor, temperature: float, min_p: float) -> Tensor:
        """Encode Int['b p'] prompts (eagerly: prompt lengths vary), choose the first new token
        Int['b 1'] and set the buffers for the steps that follow."""
        logits = self._logits(prompt, torch.arange(prompt.shape[1], device = prompt.device))
        self.last_token.copy_(choose_tokens(logits, temperature, min_p)[:, None])
        self.position.fill_(prompt.shape[1])
        return self.last_token


def text_decoder(model, batch: int, slots: int, compile_step: bool) -> TextDecoder:
    """The model's decoder for this batch size and length, reused across calls so a compiled
    step (and its CUDA graph) is built once. Reuse is safe: a prompt's prefill overwrites the
    slots it needs and the mask hides the rest."""
    dtype = KVCache.for_model(model, 1, 1).keys[0].dtype
    key = (batch, slots, model.device, dtype, compile_step)
    decoders = model.__dict__.setdefault('_text_decoders', {})
    if key not in decoders:
        decoders.clear()  # one cache alive at a time: they can be large
        with torch.inference_mode(False):   # kept buffers must stay writable outside inference mode
            decoders[key] = TextDecoder(model, batch, slots, compile_step = compile_step)
    return decoders[key]


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
    Only text ids are produced (special tokens are never sampled)."""
    check_text_sampling(temperature, min_p)
    if not is_integer(seq_len):
        raise TypeError(f'seq_len must be an int, got {type(seq_len).__name__}')
    if seq_len < 1:
        raise ValueError(f'seq_len (the length with the prompt) must be at least 1, got {seq_len}')
    cache_kv, compile_step = check_flag(cache_kv, 'cache_kv'), check_flag(compile_step, 'compile_step')
    if not torch.is_tensor(prompt):
        raise TypeError(f'prompt must be a tensor of token ids (b, p), got {type(prompt).__name__}')
    seq_len, temperature, min_p = int(seq_len), float(temperature), float(min_p)   # NumPy numbers pass the checks
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise ValueError(f'prompt must be integer token ids of shape (b, p) with p >= 1, got {tuple(prompt.shape)} {prompt.dtype}')
    text_count = model.config.num_text_tokens
    prompt = prompt.long()        # range checks on uint8 / int16 ids would wrap
    if bool(((prompt < 0) | (prompt >= text_count)).any()):
        raise ValueError(f'prompt ids must lie in [0, num_text_tokens={text_count})')
    prompt = prompt.to(model.device).long()
    b, p = prompt.shape
    if seq_len <= p:
        return prompt.new_zeros((b, 0))

    out = torch.empty((b, seq_len), dtype = torch.long, device = model.device)
    out[:, :p] = prompt
    if not cache_kv:
        with weights_cast_once(model):
            for index in range(p, seq_len):
                out[:, index] = choose_tokens(model.text_logits(out[:, :index])[:, -1, :text_count], temperature, min_p)
        return out[:, p:]
    decoder = text_decoder(model, b, seq_len, compile_step)
    with weights_cast_once(model, decoder.cast_weights):
        out[:, p:p + 1] = decoder.prefill(prompt, temperature, min_p)
        decoder.decode_into(out, p + 1, temperature, min_p)
    return out[:, p:]

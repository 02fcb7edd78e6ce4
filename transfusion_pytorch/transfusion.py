"""The Transfusion module: one transformer, next-token text and flow-matched modalities.

Training forward, research predictions and sampling share the layers but not code paths:
- `forward(Int['b n'])`: text-only language modelling (plain causal attention);
- `forward(list of samples)` / `predict(...)`: packed interleaved batches (attention rule of
  masks.py), text cross-entropy and flow-matching MSE;
- `sample`, `sample_many`, `generate_text_only`, `generate_modality_only`: see sampling.py and
  text_generation.py.

Time convention: t in [0, 1], t = 0 noise, t = 1 data; x_t = (1 - t) * noise + t * x1.

Glossary: b batch, n tokens, d model dim, v vocabulary, i instances, l latent tokens, c dim_latent.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from . import flow, objective
from .batch import PackedBatch, pack
from .items import as_modality_index, to_items
from .config import TransfusionConfig
from .keywords import build_config
from .debug import Batch, Flag, Times, typechecked
from .masks import AlibiSlopes, causal_mask
from .token_layout import packed_transformer_inputs
from .modality import Modalities
from .modes import eval_mode
from .sampling_options import is_integer
from .objective import LossBreakdown
from .tokens import Vocabulary
from .transformer import Transformer


@dataclass
class Prediction:
    """What the model predicts for a batch at given times and noise (see `Transfusion.predict`).

    logits: per sample, Float['n_s v'] next-token logits at every position of its packed sequence.
    token_ids: per sample, Int['n_s'] the packed tokens (BOS, text, begin/shape/end tokens, EOS),
        with -1 at latent positions.
    velocities, targets, noised: per modality instance in order of appearance, in the latent
        layout the user passes (channel-first where configured): predicted velocity, the target
        x1 - noise, and the network input x_t.
    times: Float['i'] the instances' times.
    instance_modality: the modality index of each instance.
    """
    logits: list[Tensor]
    token_ids: list[Tensor]
    velocities: list[Tensor]
    targets: list[Tensor]
    noised: list[Tensor]
    times: Tensor
    instance_modality: list[int]


# an encoder or decoder for every modality, one per modality (None: that modality has none), or none
Coders = nn.Module | Sequence[nn.Module | None] | None


def _per_modality(value, count: int) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != count:
            raise ValueError(f'expected one encoder/decoder per modality ({count}), got {len(value)}')
        return tuple(value)
    return (value,) * count


class Transfusion(nn.Module):
    """Transfusion (Zhou et al. 2024) with flow matching, for any number of modalities.

    Keyword arguments follow the README: `num_text_tokens`, `transformer=dict(dim=..., depth=...)`
    (see TransformerConfig), `dim_latent` (an int, or one per modality), `modality_default_shape`,
    `channel_first_latent`, `add_modality_shape_tokens`, `modality_loss_weight`,
    `modality_encoder` / `modality_decoder` (a module or one per modality; encoders frozen
    unless `train_modality_encoders=True`, decoders always frozen), and any other TransfusionConfig field (loss weights, time
    sampling, noise limiting, condition dropout, ...) but `modalities`, which the per-modality
    keywords build; a ready TransfusionConfig goes to `Transfusion.from_config`.
    """

    def __init__(self, num_text_tokens: int, transformer: dict, modality_encoder: Coders = None, modality_decoder: Coders = None,
                 train_modality_encoders: bool = False, **config_kwargs):
        super().__init__()
        config = build_config(num_text_tokens = num_text_tokens, transformer = transformer, **config_kwargs)
        self._build(config, modality_encoder, modality_decoder, train_modality_encoders)

    @classmethod
    def from_config(cls, config: TransfusionConfig, modality_encoder: Coders = None, modality_decoder: Coders = None,
                    train_modality_encoders: bool = False) -> 'Transfusion':
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(config, modality_encoder, modality_decoder, train_modality_encoders)
        return model

    def _build(self, config: TransfusionConfig, encoders, decoders, train_encoders: bool) -> None:
        self.config = config
        self.vocab = Vocabulary(config.num_text_tokens, config.num_modalities)
        dim = config.transformer.dim
        self.token_embedding = nn.Embedding(self.vocab.size, dim)
        nn.init.normal_(self.token_embedding.weight, std = 0.02)
        self.transformer = Transformer(config.transformer)
        self.to_logits = nn.Linear(dim, self.vocab.size, bias = False)
        self.alibi = AlibiSlopes(config.transformer.heads, config.alibi_heads)
        count = config.num_modalities
        self.modalities = Modalities(config, _per_modality(encoders, count), _per_modality(decoders, count), train_encoders)

    def __getstate__(self) -> dict:
        """Text decoders (KV caches, compiled steps) and the compiled ODE evaluation are a
        per-process cache, left out of pickles and deep copies."""
        state = super().__getstate__()
        state.pop('_text_decoders', None)
        state.pop('_compiled_evaluation', None)
        return state

    def reset_parameters(self) -> None:
        """Initialise every weight of the library's modules as construction does (the same
        distributions, not the same draws), for a model built on the meta device and moved with
        `to_empty`. The user's encoders and decoders are left as they are: `to_empty` emptied
        them too, so load their weights again."""
        coders = {id(m) for m in (*self.modalities.encoders.modules(), *self.modalities.decoders.modules())}
        for module in reversed(list(self.modules())):   # descendants first: a parent's own init wins
            if module is not self and id(module) not in coders and hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        nn.init.normal_(self.token_embedding.weight, std = 0.02)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # training

    @typechecked
    def forward(self, batch: Batch, *, modality_type: Integral | None = None, return_breakdown: bool = False,
                times: Times = None, noise: Sequence[Tensor] | None = None
                ) -> Float[Tensor, ''] | tuple[Float[Tensor, ''], LossBreakdown]:
        """Scalar training loss (and a LossBreakdown with return_breakdown=True).

        batch: Int['b n'] text-only language modelling; Float['b ...'] modality-only training
            (each row one instance of `modality_type`, default 0); or a list of samples (see
            items.py). times (Float['i']) and noise (one tensor per instance, latent layout) fix
            the flow-matching draws, in order of appearance; by default they are sampled.
        """
        if torch.is_tensor(batch) and not batch.is_floating_point():
            if modality_type is not None or times is not None or noise is not None:
                raise ValueError('modality_type, times and noise apply to modality instances; an integer tensor batch is text-only language modelling')
            breakdown = objective.text_only_loss(self, batch)
        else:
            with self.modalities.encoder_state_kept_on_error():
                packed, check = self.pack(self._as_samples(batch, modality_type), defer_check = True)
                breakdown = objective.packed_loss(self, packed, times, noise)
                check.raise_if_invalid()   # after queueing the forward; waits for the check alone, not the forward
        return (breakdown.total, breakdown) if return_breakdown else breakdown.total

    def _as_samples(self, batch, modality_type: int | None):
        if torch.is_tensor(batch):
            if modality_type is None:
                modality_type = 0
            if (index := as_modality_index(modality_type)) is None:
                raise TypeError(f'modality_type must be a modality index (an int), got {type(modality_type).__name__}')
            modality_type = index
            if self.config.num_modalities == 0:
                raise ValueError('a floating tensor batch is modality-only training, but this model has no modalities (pass dim_latent to Transfusion)')
            if not 0 <= modality_type < self.config.num_modalities:
                raise ValueError(f'modality_type {modality_type}: this model has {self.config.num_modalities} modalities')
            if batch.ndim < 1 or batch.shape[0] == 0:
                raise ValueError(f'modality-only training expects a floating tensor (b, ...) with b >= 1, got shape {tuple(batch.shape)}')
            return [[(modality_type, row)] for row in batch.unbind(0)]
        if modality_type is not None:
            raise ValueError('modality_type applies to a floating tensor batch (modality-only training), not to a list of samples')
        return batch

    def pack(self, batch: Batch, close: bool = True, defer_check: bool = False) -> PackedBatch | tuple[PackedBatch, Any]:
        """Validate a list of samples and lay it out as one packed sequence on the model's device.
        defer_check: also return the batch's ValueCheck instead of raising at once (see items.py);
        the caller then keeps the encoders' state until it has raised (as `forward` does)."""
        keep_state = nullcontext() if defer_check else self.modalities.encoder_state_kept_on_error()
        with keep_state:
            samples, check = to_items(batch, self.config, self.modalities.encode)
            if not defer_check:
                check.raise_if_invalid()
        packed = pack(samples, self.config, self.vocab, self.device, close = close)
        return (packed, check) if defer_check else packed

    @typechecked
    def text_logits(self, ids: Int[Tensor, 'b n']) -> Float[Tensor, 'b n v']:
        """Float['b n v'] next-token logits for text-only rows Int['b n'] (causal attention)."""
        b, n = ids.shape
        mask = causal_mask(n, ids.device, self.config.transformer.attention_backend)
        positions = torch.arange(n, device = ids.device)[None]
        hidden = self.transformer(self.token_embedding(ids), positions, mask)
        return self.to_logits(hidden)

    @typechecked
    def packed_hidden(self, packed: PackedBatch, group_inputs: list[Float[Tensor, '_l _c']], times: Float[Tensor, 'i'],
                      isolated: Bool[Tensor, 'n'] | None = None, cache: list | None = None, kv_length: int | None = None,
                      compiled: bool = True) -> Float[Tensor, 'n d']:
        """Hidden states Float['n d'] of a packed sequence whose latent groups take the inputs
        `group_inputs` (Float['l c'] each) at per-instance times Float['i'].

        cache/kv_length: write keys and values into a static KV cache of kv_length slots (one
        sample per cache row, prompts in sampling); attention is then dense over the slots."""
        x = self.token_embedding(packed.token_ids)                                          # (n, d)
        time_embedding = self.modalities.time_embedding(times) if packed.groups else None   # (i, d)
        for group, inputs in zip(packed.groups, group_inputs):
            tokens = self.modalities.embed_group(group.modality, inputs.to(x.dtype), group.shapes, time_embedding[group.instance])
            x = x.index_copy(0, group.index, tokens.to(x.dtype))
        positions, mask, routing, instance, pad = packed_transformer_inputs(self, packed, isolated, kv_length)
        modulations = None
        if self.modalities.adaptive is not None and packed.groups:
            modulations = self.modalities.adaptive.per_block(time_embedding, instance[None])
        hidden = self.transformer(F.pad(x, (0, 0, 0, pad))[None], positions[None], mask, modulations,
                                  cache = cache, compiled = compiled, routing = routing)
        return hidden[0, :packed.length]

    # research access

    @torch.no_grad()
    @typechecked
    def predict(self, batch: Batch, times: Times = None, noise: Sequence[Tensor] | None = None, *,
                modality_type: Integral | None = None) -> Prediction:
        """Per-token text logits and per-instance velocities for a batch at the given times and
        noise (drawn when not given), without dropout of conditioning. Runs under no_grad; call
        `predict.__wrapped__(model, ...)` for gradients."""
        with eval_mode(self):   # from packing on: a trainable encoder must not run in train mode here
            packed = self.pack(self._as_samples(batch, modality_type))
        return self.predict_packed(packed, times, noise)

    def predict_packed(self, packed: PackedBatch, times: Tensor | None = None, noise: Sequence[Tensor] | None = None) -> Prediction:
        """`predict` for a batch already packed (and encoded) by `pack`, in eval mode, with
        gradients unless the caller turns them off: several predictions of one batch (as in
        consistency training) encode it once."""
        with eval_mode(self):
            times, group_noise, _ = objective.draw(self, packed, times, noise)
            noised_inputs = [flow.noised(g.data, n, times[g.data_instance]) for g, n in zip(packed.groups, group_noise)]
            hidden = self.packed_hidden(packed, noised_inputs, times)
            # x_t in the model's dtype, as the loss passes it: a U-Net re-reads it for its skip path
            velocities = [self.modalities.velocity_group(g.modality, hidden[g.index], x_t.to(hidden.dtype), g.shapes)
                          for g, x_t in zip(packed.groups, noised_inputs)]
        logits = self.to_logits(hidden)
        token_ids = packed.token_ids.masked_fill(packed.instance >= 0, -1)
        per_instance = lambda tensors: self._split_instances(packed, tensors)
        targets = [flow.velocity_target(g.data, n) for g, n in zip(packed.groups, group_noise)]
        return Prediction(
            logits = [logits[a:b] for a, b in packed.sample_slices],
            token_ids = [token_ids[a:b] for a, b in packed.sample_slices],
            velocities = per_instance(velocities), targets = per_instance(targets), noised = per_instance(noised_inputs),
            times = times, instance_modality = list(packed.instance_modality),
        )

    def _split_instances(self, packed: PackedBatch, group_tensors: list[Tensor]) -> list[Tensor]:
        """Per-group Float['l c'] tensors -> per-instance tensors in the user's latent layout."""
        out = [None] * packed.num_instances
        for group, tensor in zip(packed.groups, group_tensors):
            members = [i for i, m in enumerate(packed.instance_modality) if m == group.modality]
            sizes = [math.prod(packed.instance_shape[i]) for i in members]
            for i, chunk in zip(members, tensor.split(sizes)):
                out[i] = self.to_user_layout(packed.instance_modality[i], chunk.reshape(*packed.instance_shape[i], -1))
        return out

    def to_user_layout(self, modality: int, latent: Tensor) -> Tensor:
        """Float['*axes c'] -> the user's layout for that modality (channel-first where configured)."""
        return latent.movedim(-1, 0) if self.config.modalities[modality].channel_first else latent

    # sampling (sampling.py, text_generation.py)

    # fixed_modality_shape, force_modality_at_start and seed are left unannotated: sampling_options
    # checks them with messages that name the argument, which debug mode's checker would pre-empt
    @typechecked
    def sample_many(self, prompts: Sequence, *, max_length: Integral = 2048, text_temperature: Real = 1., text_min_p: Real = 0.1,
                    cache_kv: Flag = True, modality_steps: Integral = 16, ode_method: str = 'midpoint',
                    fixed_modality_shape = None, force_modality_at_start = None, cfg_scale: Real = 1.,
                    seed = None, show_progress: Flag = True, stop_after_modality: Flag = False,
                    cuda_graphs: Flag = True) -> list[list]:
        """Sample one continuation per prompt, batched: rows in the same phase share forwards.

        prompts: each None, text (Int['t']), a modality (a floating tensor, or (index, tensor),
            raw data when there is an encoder) or a whole interleaved sample (a list of items).
        max_length: tokens per sample in all (BOS, prompt, special, latent tokens).
        text_temperature, text_min_p: text sampling (temperature >= 0, 0 is greedy); min-p in
            [0, 1] keeps tokens with p >= text_min_p * p_max.
        cache_kv: static KV cache; False recomputes the whole sequence each step (the same text,
            latents to rounding; to an adaptive solver's tolerance with one).
        modality_steps, ode_method: torchdiffeq solver and its number of equal steps over t in
            [0, 1]; evaluations of the network = modality_steps x (1 euler, 2 midpoint or heun2,
            3 heun3, 4 rk4); adaptive solvers ('dopri5', ...) choose their own steps.
        fixed_modality_shape: one shape for every modality it fits (number of axes, fixed shape,
            downsample factor, max_shape_value), or {index: shape}.
        force_modality_at_start: start with this modality index, or (index, shape).
        cfg_scale: classifier-free guidance; the unconditional branch (latents seeing only their
            own instance) runs in the same forward; 1 disables it at no extra cost.
        seed: an int (row r uses seed + r) or one int per prompt; each row then draws from its own
            generator, so the result does not depend on the batch (latents up to rounding).
        stop_after_modality: end each sample right after the first modality it generates (e.g.
            one image per text prompt), without encoding it for more text.
        cuda_graphs: on a GPU with cache_kv, capture each modality instance's ODE evaluation as a
            CUDA graph on its first evaluation and replay it for the rest (same result, far fewer
            kernel launches; module hooks then run only while capturing); False runs every
            evaluation eagerly.
        Returns, per prompt, a list of items: text as 1-D long tensors of text ids, modalities as
        (index, tensor) in the user's layout (decoded when there is a decoder), prompt included.
        """
        from .sampling import sample_many
        return sample_many(
            self, prompts, max_length = max_length, text_temperature = text_temperature, text_min_p = text_min_p,
            cache_kv = cache_kv, modality_steps = modality_steps, ode_method = ode_method,
            fixed_modality_shape = fixed_modality_shape, force_modality_at_start = force_modality_at_start,
            cfg_scale = cfg_scale, seed = seed, show_progress = show_progress, stop_after_modality = stop_after_modality,
            cuda_graphs = cuda_graphs,
        )

    @typechecked
    def sample(self, prompt: Any = None, **kwargs) -> list:
        """One sample from `prompt` (None, text, a modality or a sample; see `sample_many`, which
        checks it with its own messages); the keywords of `sample_many`."""
        return self.sample_many([prompt], **kwargs)[0]

    @typechecked
    def generate_modality_only(self, batch_size: Integral = 1, modality_type: Integral = 0, fixed_modality_shape: Sequence[Integral] | None = None,
                               modality_steps: Integral = 16, ode_method: str = 'midpoint', cfg_scale: Real = 1., seed = None,
                               show_progress: Flag = False, cuda_graphs: Flag = True) -> Float[Tensor, 'b ...']:
        """Float['b ...'] instances of one modality generated unconditionally (after BOS), in the
        user's layout and decoded; the shape is fixed_modality_shape or the default shape.
        The other keywords are those of `sample_many`."""
        from .sampling import sample_many
        from .sampling_options import forced_start
        count = self.config.num_modalities
        for name, value in (('modality_type', modality_type), ('batch_size', batch_size)):
            if not is_integer(value):
                raise TypeError(f'{name} must be an int, got {type(value).__name__}')
        modality_type, batch_size = int(modality_type), int(batch_size)
        if not 0 <= modality_type < count:
            raise ValueError(f'modality_type {modality_type} is not a modality of this model ({count} modalit{"y" if count == 1 else "ies"})')
        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}')
        spec = self.config.modalities[modality_type]
        shape = fixed_modality_shape if fixed_modality_shape is not None else spec.default_shape
        if shape is None:
            raise ValueError(f'modality {modality_type} has no default shape: pass fixed_modality_shape')
        _, shape = forced_start(self, (modality_type, shape), 'fixed_modality_shape')   # a shape training would accept
        token_shape = spec.token_shape(shape)
        length = 2 + (len(self.vocab.shape_ids(token_shape)) if spec.shape_tokens else 0) + math.prod(token_shape) + 1
        samples = sample_many(
            self, [None] * batch_size, max_length = length, modality_steps = modality_steps, ode_method = ode_method,
            cfg_scale = cfg_scale, force_modality_at_start = (modality_type, shape), seed = seed,
            show_progress = show_progress, stop_after_modality = True, cuda_graphs = cuda_graphs,
        )
        return torch.stack([sample[-1][1] for sample in samples])

    @typechecked
    def generate_text_only(self, prompt: Tensor, seq_len: Integral, temperature: Real = 1., min_p: Real = 0.1,
                           cache_kv: Flag = True, compile_step: Flag | None = None) -> Int[Tensor, 'b new']:
        """Text-only continuation of Int['b p'] prompts to seq_len tokens in all; returns the new
        tokens Int['b (seq_len - p)']. compile_step (default: the transformer's compile_blocks):
        torch.compile the decode step (CUDA graphs on a GPU, a C++ launch wrapper on CPU). The
        model keeps one decoder, with its cache, for the latest batch size and length: later calls
        of that size reuse its compiled step at any temperature and min-p, a call of another
        size compiles a new one."""
        from .text_generation import generate_text_only
        if compile_step is None:
            compile_step = self.config.transformer.compile_blocks
        with eval_mode(self):
            return generate_text_only(self, prompt, seq_len, temperature, min_p, cache_kv, compile_step)

    # ---------------------------------------------------------------------------------------
    # checkpoints (checkpoint.py): thin entry points; the format and its guarantees live there

    def save_pretrained(self, directory: str | os.PathLike, include_coders: bool | None = None) -> None:
        """Save config and weights to `directory`, atomically (a crash leaves the previous
        checkpoint). Encoder/decoder weights with include_coders=True, by default when the
        encoders are trained; either way pass the encoder/decoder modules again to `from_pretrained`."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory, include_coders = include_coders)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, modality_encoder: Coders = None, modality_decoder: Coders = None, **kwargs: Any) -> 'Transfusion':
        """Rebuild a model saved by `save_pretrained`; see `checkpoint.load_pretrained` for the
        keywords (train_modality_encoders, map_location, dtype, runtime options such as compile_blocks)."""
        from .checkpoint import load_pretrained
        return load_pretrained(directory, modality_encoder, modality_decoder, model_class = cls, **kwargs)

"""Frozen configuration dataclasses.

Everything that decides the architecture or the loss lives here, validated once, so that the
modules can trust their inputs. The README-style keywords that build them (`dim_latent=(384,
192)`, `transformer=dict(dim=512, depth=8)`) are read by `keywords.build_config`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

AttentionBackend = Literal['auto', 'sdpa', 'flex']
TimeSampling = Literal['uniform', 'logit_normal']
TimeConditioning = Literal['additive', 'adaptive']


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any, least: float = 0.) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= least


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0. <= value < 1.


def _require_flags(flags: dict[str, Any]) -> None:
    """Each flag (keyword name -> value) is True or False: the modules test flags by truthiness,
    so a string such as 'False' from a command line or a YAML file would switch the option on."""
    for name, value in flags.items():
        _require(isinstance(value, bool), f'{name} must be True or False, got {value!r}')


@dataclass(frozen = True)
class TransformerConfig:
    """The shared transformer. Options from the cited papers are off by default.

    dim, depth, heads, dim_head: the usual; attention inner width is heads * dim_head.
    ff_mult: the gated feed-forward's hidden width is int(dim * ff_mult * 2 / 3), which gives a
        gated layer the parameter count of a plain dim -> ff_mult * dim -> dim MLP.
    attention_backend: 'sdpa' (dense boolean mask), 'flex' (flex_attention with a BlockMask) or
        'auto' (flex on CUDA, SDPA elsewhere, where it measured faster).
    qk_norm: RMSNorm on queries and keys per head (Dehghani et al. 2023).
    unet_skips: long skip connections from the first half of the stack to the mirrored block of the
        second half (U-ViT, Bao et al. 2022).
    dropout: in training, the probability of zeroing each unit of a block's attention output
        (its heads' output, before the output projection) and of the feed-forward's hidden
        layer. The same on every attention backend: the attention weights are never dropped,
        since flex attention (the CUDA default) cannot drop them.
    value_residual: every layer mixes in the first layer's values with a learned gate
        (value residual learning, Zhou et al. 2024).
    laser: attention on exponentiated values, log of the result (LASER, Duvvuri & Dhillon 2024).
    experts: number of expert weight sets for the attention projections and feed-forward
        layers; the caller routes each token (Transfusion sets 1 + number of modalities when
        modality_experts is on). 1: an ordinary transformer.
    compile_blocks: torch.compile each block for training and full-sequence forwards, and the
        text decode step of generate_text_only (with CUDA graphs on a GPU, a C++ launch
        wrapper on CPU).
    compile_stack: with compile_blocks, compile the whole stack of blocks as one region instead
        of each block alone: one guard check and one autograd function per forward instead of
        one per block, and fusion across block boundaries, for a compile about twice as long.
    compile_options: Inductor options for the compiles of compile_blocks / compile_stack, as
        torch.compile's `options` (a dict; kept as sorted (name, value) pairs so the config
        stays hashable and JSON round-trips), e.g. {'cpp_wrapper': True} for a C++ instead of
        a Python kernel-launch wrapper, or {'triton.cudagraphs': True} for CUDA graphs (what
        mode='reduce-overhead' sets). Names are checked by torch.compile here, at construction.
    checkpoint_activations: recompute block activations in the backward pass to save memory.
    ff_pad_multiple: compute the feed-forward's hidden layer padded with units of zero weight up
        to a multiple of this width (e.g. 16: int(1024 * 4 * 2 / 3) = 2730 becomes 2736, whose
        bf16 rows are 16-byte aligned for GPU matrix kernels). The padded units stay exactly
        zero in value and gradient, so the model and its parameters' shapes are unchanged; in
        training with dropout, the dropout mask is drawn over the padded width, so its draws differ.
    """
    dim: int
    depth: int
    heads: int = 8
    dim_head: int = 64
    ff_mult: float = 4.
    dropout: float = 0.
    rotary_theta: float = 10_000.
    attention_backend: AttentionBackend = 'auto'
    qk_norm: bool = False
    unet_skips: bool = False
    value_residual: bool = False
    laser: bool = False
    experts: int = 1
    compile_blocks: bool = False
    compile_stack: bool = False
    compile_options: Any = ()
    checkpoint_activations: bool = False
    ff_pad_multiple: int = 1

    def __post_init__(self):
        for name in ('dim', 'depth', 'heads', 'dim_head', 'experts', 'ff_pad_multiple'):
            _require(_is_positive_int(getattr(self, name)), f'transformer.{name} must be a positive int, got {getattr(self, name)!r}')
        _require_flags({f'transformer.{name}': getattr(self, name) for name in (
            'qk_norm', 'unet_skips', 'value_residual', 'laser', 'compile_blocks', 'compile_stack', 'checkpoint_activations')})
        _require(self.compile_blocks or not self.compile_stack,
                 'transformer.compile_stack compiles the stack in place of each block, so it needs compile_blocks=True')
        # activation checkpointing inside one compiled region puts torch's run-and-save-RNG op in the
        # graph, which Inductor's C++ wrapper cannot launch (torch 2.13: the first training step failed)
        _require(not (self.compile_stack and self.checkpoint_activations and dict(self.compile_options).get('cpp_wrapper')),
                 'transformer.checkpoint_activations with compile_stack cannot use compile_options cpp_wrapper (Inductor '
                 'cannot launch the RNG-state op checkpointing adds to the region); compile per block (compile_stack=False) instead')
        _require(self.dim_head % 2 == 0, f'transformer.dim_head must be even for rotary positions, got {self.dim_head}')
        _require(_is_finite_number(self.ff_mult) and self.ff_mult > 0, f'transformer.ff_mult must be a positive number, got {self.ff_mult!r}')
        _require(self.dim_ff >= 1, f'transformer.ff_mult={self.ff_mult} leaves the feed-forward with int(dim * ff_mult * 2 / 3) = 0 hidden units')
        _require(_is_probability(self.dropout), f'transformer.dropout must be in [0, 1), got {self.dropout!r}')
        _require(_is_finite_number(self.rotary_theta) and self.rotary_theta > 0, f'transformer.rotary_theta must be a positive number, got {self.rotary_theta!r}')
        _require(self.attention_backend in ('auto', 'sdpa', 'flex'), f"transformer.attention_backend must be 'auto', 'sdpa' or 'flex', got {self.attention_backend!r}")
        _require(not (self.unet_skips and self.depth % 2), f'transformer.unet_skips needs an even depth, got depth={self.depth}')
        object.__setattr__(self, 'compile_options', _normalise_compile_options(self.compile_options))

    @property
    def dim_ff(self) -> int:
        return int(self.dim * self.ff_mult * 2 / 3)

    @property
    def compile_options_dict(self) -> dict | None:
        """compile_options as torch.compile's `options` (None when there are none)."""
        return dict(self.compile_options) or None


def _normalise_compile_options(options: Any) -> tuple[tuple[str, Any], ...]:
    """A dict (or (name, value) pairs, as JSON gives them back) -> sorted pairs, each name
    checked by torch.compile, which validates options when it wraps a function."""
    pairs = options.items() if isinstance(options, dict) else options
    try:
        pairs = tuple(sorted((name, value) for name, value in pairs))
    except (TypeError, ValueError):
        raise ValueError(f'transformer.compile_options must be a dict of Inductor option names to values, got {options!r}') from None
    for name, value in pairs:
        _require(isinstance(name, str), f'transformer.compile_options: option names must be strings, got {name!r}')
        _require(isinstance(value, (bool, int, float, str)), f'transformer.compile_options[{name!r}] must be a bool, number or string, got {value!r}')
    if pairs:
        try:
            torch.compile(_identity, options = dict(pairs))
        except RuntimeError as error:
            raise ValueError(f'transformer.compile_options: {error}'.split(', known options')[0]) from None
    return pairs


def _identity(x):
    return x


@dataclass(frozen = True)
class ModalityConfig:
    """One continuous modality.

    dim_latent: size of one latent token (the last axis, or the first with channel_first).
    default_shape: the latent grid used when sampling cannot read a shape, and the fixed shape when
        shape_tokens is False; its length fixes the modality's number of axes. None: any number
        of axes, and sampling needs a shape from the model, a prompt or fixed_modality_shape.
    channel_first: latents are (dim_latent, *axes) instead of (*axes, dim_latent).
    shape_tokens: write the shape as tokens after the begin token (the LM learns to emit it).
    loss_weight: this modality's weight in the flow loss average.
    downsample: > 1 wraps the transformer in a one-level U-Net for this modality (simple
        diffusion, Hoogeboom et al. 2023): every axis is downsampled by this factor on the way
        in and upsampled with a skip connection on the way out, so the transformer sees
        prod(axes) / downsample^axes tokens. Shapes (inputs, outputs, fixed shapes) stay at full
        resolution; the shape tokens describe the transformer-side grid.
    unet_dim: width of the U-Net's full-resolution features (default 4 * dim_latent).
    """
    dim_latent: int
    default_shape: tuple[int, ...] | None = None
    channel_first: bool = False
    shape_tokens: bool = True
    loss_weight: float = 1.
    downsample: int = 1
    unet_dim: int | None = None

    def __post_init__(self):
        _require(_is_positive_int(self.dim_latent), f'dim_latent must be a positive int, got {self.dim_latent!r}')
        _require_flags(dict(channel_first_latent = self.channel_first, add_modality_shape_tokens = self.shape_tokens))
        if self.default_shape is not None:
            _require(isinstance(self.default_shape, tuple) and all(_is_positive_int(a) for a in self.default_shape),
                     f'modality_default_shape must be a tuple of positive ints, got {self.default_shape!r}')
        _require(self.shape_tokens or self.default_shape is not None,
                 'a modality without shape tokens needs a modality_default_shape to use as its fixed shape')
        _require(_is_finite_number(self.loss_weight) and self.loss_weight > 0, f'modality loss_weight must be a positive number, got {self.loss_weight!r}')
        _require(_is_positive_int(self.downsample), f'modality_downsample must be a positive int, got {self.downsample!r}')
        _require(self.unet_dim is None or _is_positive_int(self.unet_dim), f'modality_unet_dim must be a positive int, got {self.unet_dim!r}')
        _require(self.unet_dim is None or self.downsample > 1,
                 f'modality_unet_dim={self.unet_dim} is the width of the U-Net that modality_downsample > 1 builds, but downsample is 1')
        if self.downsample > 1:
            _require(self.default_shape is not None and len(self.default_shape) > 0,
                     'modality_downsample needs a modality_default_shape with at least one axis (it fixes the number of axes)')
            _require(all(a % self.downsample == 0 for a in self.default_shape),
                     f'modality_default_shape {self.default_shape} must be divisible by modality_downsample={self.downsample}')

    @property
    def num_axes(self) -> int | None:
        return None if self.default_shape is None else len(self.default_shape)

    def token_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The transformer-side grid of a latent of `shape` (axes divided by downsample)."""
        return tuple(a // self.downsample for a in shape)

    def data_shape(self, token_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a * self.downsample for a in token_shape)


@dataclass(frozen = True)
class TransfusionConfig:
    """The whole model.

    text_loss_weight, flow_loss_weight: loss = text_loss_weight * CE + flow_loss_weight * flow MSE.
    time_sampling: how training draws t in [0, 1] (t = 0 noise, t = 1 data): 'uniform', or
        'logit_normal' (Esser et al. 2024), which favours the middle of the path.
    time_conditioning: 'additive' adds a time embedding to each latent token (the paper's choice);
        'adaptive' also scales and shifts the latent tokens' norms in every block (adaLN-style),
        computed once per modality instance and never applied to text.
    noise_limit_before_text: a modality followed by text in the same sample draws t from the
        cleaner half [0.5, 1] (the paper's noise limiting for captioning).
    condition_dropout: probability that a modality instance is trained unconditionally (its latent
        tokens see only their own instance), which classifier-free guidance needs.
    causal_modality_attention: attention inside a modality instance causal instead of
        bidirectional (the paper's ablation; off for real use).
    max_shape_value: the largest axis length the shape tokens may encode.
    axial_rotary: latent tokens get axial rotary positions over their grid (one rotary section
        per axis) instead of their raster index; text keeps 1-D rotary. Needs every modality's
        number of axes (a default shape).
    alibi_heads: this many heads add N-d ALiBi inside modality instances: a bias that falls
        linearly with the Euclidean distance of two latent tokens on the instance's grid.
    modality_experts: separate attention projections and feed-forward weights for text and for
        each modality, attention shared (mixture of experts by modality).
    """
    num_text_tokens: int
    transformer: TransformerConfig
    modalities: tuple[ModalityConfig, ...] = ()
    text_loss_weight: float = 1.
    flow_loss_weight: float = 1.
    time_sampling: TimeSampling = 'uniform'
    time_conditioning: TimeConditioning = 'additive'
    noise_limit_before_text: bool = False
    condition_dropout: float = 0.
    causal_modality_attention: bool = False
    max_shape_value: int = 9999
    axial_rotary: bool = False
    alibi_heads: int = 0
    modality_experts: bool = False

    def __post_init__(self):
        _require(_is_positive_int(self.num_text_tokens), f'num_text_tokens must be a positive int, got {self.num_text_tokens!r}')
        _require_flags({name: getattr(self, name) for name in (
            'noise_limit_before_text', 'causal_modality_attention', 'axial_rotary', 'modality_experts')})
        _require(isinstance(self.transformer, TransformerConfig), f'transformer must be a TransformerConfig, got {type(self.transformer).__name__}')
        _require(all(isinstance(m, ModalityConfig) for m in self.modalities), 'modalities must be ModalityConfig instances')
        for name in ('text_loss_weight', 'flow_loss_weight'):
            _require(_is_finite_number(getattr(self, name)), f'{name} must be a finite non-negative number, got {getattr(self, name)!r}')
        _require(self.time_sampling in ('uniform', 'logit_normal'), f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        _require(self.time_conditioning in ('additive', 'adaptive'), f"time_conditioning must be 'additive' or 'adaptive', got {self.time_conditioning!r}")
        _require(_is_probability(self.condition_dropout), f'condition_dropout must be in [0, 1), got {self.condition_dropout!r}')
        _require(_is_positive_int(self.max_shape_value), f'max_shape_value must be a positive int, got {self.max_shape_value!r}')
        _require(isinstance(self.alibi_heads, int) and not isinstance(self.alibi_heads, bool) and 0 <= self.alibi_heads <= self.transformer.heads,
                 f'alibi_heads must be an int in [0, heads={self.transformer.heads}], got {self.alibi_heads!r}')
        _require(not self.axial_rotary or all(m.num_axes is not None for m in self.modalities),
                 'axial_rotary needs every modality\'s number of axes: give each a modality_default_shape')
        _require(not self.axial_rotary or self.transformer.dim_head // 2 >= 1 + self.max_axes,
                 f'axial_rotary splits the dim_head / 2 rotary frequencies into 1 + {self.max_axes} sections: dim_head must be at least {2 * (1 + self.max_axes)}')
        experts = 1 + self.num_modalities if self.modality_experts else 1
        _require(self.transformer.experts == experts,
                 f'transformer.experts must be {experts} with modality_experts={self.modality_experts} (build with Transfusion(...) or build_config, which set it)')
        for index, modality in enumerate(self.modalities):
            for axis in modality.default_shape or ():
                _require(axis <= self.max_shape_value, f'modality {index} default shape {modality.default_shape} exceeds max_shape_value={self.max_shape_value}')

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def max_axes(self) -> int:
        """Most axes of any modality (at least 1), for axial positions."""
        return max([m.num_axes or 0 for m in self.modalities] + [1])

    def to_dict(self) -> dict:
        """Nested dicts of plain values, JSON-serialisable (tuples stay tuples here; JSON writes
        them as lists, and from_dict reads either)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> 'TransfusionConfig':
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        _require(not unknown, f'unknown TransfusionConfig fields {sorted(unknown)}')
        data = dict(data)
        _require(isinstance(data.get('num_text_tokens'), int) and isinstance(data.get('transformer'), dict),
                 'a TransfusionConfig dict needs num_text_tokens (an int) and transformer (a dict)')
        _require(all(isinstance(m, dict) and 'dim_latent' in m and 'default_shape' in m for m in data.get('modalities', ())),
                 'each modality of a TransfusionConfig dict needs dim_latent and default_shape')
        data['transformer'] = TransformerConfig(**data['transformer'])
        data['modalities'] = tuple(
            ModalityConfig(**{**m, 'default_shape': None if m['default_shape'] is None else tuple(m['default_shape'])})
            for m in data.get('modalities', ())
        )
        return cls(**data)

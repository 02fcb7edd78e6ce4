"""README-style keyword arguments -> a TransfusionConfig.

The README style (`dim_latent=(384, 192)`, `modality_default_shape=((4,), (2,))`,
`transformer=dict(dim=512, depth=8)`) is turned into one `ModalityConfig` per modality and one
`TransformerConfig`; the dataclasses (config.py) then validate each value.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Sequence

from .config import ModalityConfig, TransformerConfig, TransfusionConfig, _require


def _per_modality(value: Any, num_modalities: int, name: str, is_single) -> tuple:
    """A single value applies to every modality; a tuple/list gives one value per modality."""
    if is_single(value):
        return (value,) * num_modalities
    _require(isinstance(value, (tuple, list)), f'{name} must be a single value or one value per modality, got {value!r}')
    _require(len(value) == num_modalities, f'{name} has {len(value)} entries but there are {num_modalities} modalities (from dim_latent)')
    return tuple(value)


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(a, int) and not isinstance(a, bool) for a in value)


def _as_shape(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    _require(_is_shape(value), f'{name} must be a tuple of ints, got {value!r}')
    return tuple(value)


def _check_model_options(options: dict) -> None:
    """TransfusionConfig fields passed as keywords, except modalities: the per-modality keywords build it."""
    _require('modalities' not in options, 'modalities is built from dim_latent and the per-modality keywords; '
             'for a ready TransfusionConfig use Transfusion.from_config(config)')
    unknown = set(options) - {f.name for f in fields(TransfusionConfig)}
    _require(not unknown, f'unknown Transfusion options {sorted(unknown)}')


def build_config(
    num_text_tokens: int,
    transformer: dict | TransformerConfig,
    dim_latent: int | Sequence[int] | None = None,
    modality_default_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    channel_first_latent: bool | Sequence[bool] = False,
    add_modality_shape_tokens: bool | Sequence[bool] = True,
    modality_loss_weight: float | Sequence[float] = 1.,
    modality_downsample: int | Sequence[int] = 1,
    modality_unet_dim: int | None | Sequence[int | None] = None,
    **model_options: Any,
) -> TransfusionConfig:
    """README-style keywords -> TransfusionConfig. Per-modality keywords take one value for all
    modalities or one per modality; the number of modalities is the length of dim_latent."""
    transformer = _transformer_config(transformer)
    per_modality = dict(modality_default_shape = modality_default_shape, channel_first_latent = channel_first_latent,
                        add_modality_shape_tokens = add_modality_shape_tokens, modality_loss_weight = modality_loss_weight,
                        modality_downsample = modality_downsample, modality_unet_dim = modality_unet_dim)
    modalities = _modality_configs(dim_latent, **per_modality)
    _check_model_options(model_options)
    if model_options.get('modality_experts'):
        transformer = replace(transformer, experts = 1 + len(modalities))
    return TransfusionConfig(num_text_tokens = num_text_tokens, transformer = transformer, modalities = modalities, **model_options)


def _transformer_config(transformer: dict | TransformerConfig) -> TransformerConfig:
    if isinstance(transformer, dict):
        _require(all(isinstance(k, str) for k in transformer), 'transformer keys must be strings')
        unknown = set(transformer) - {f.name for f in fields(TransformerConfig)}
        _require(not unknown, f'unknown transformer options {sorted(unknown)}; known: {sorted(f.name for f in fields(TransformerConfig))}')
        _require('dim' in transformer and 'depth' in transformer, 'transformer needs at least dim and depth, e.g. transformer=dict(dim=512, depth=8)')
        transformer = TransformerConfig(**transformer)
    _require(isinstance(transformer, TransformerConfig), f'transformer must be a dict or TransformerConfig, got {type(transformer).__name__}')
    return transformer


_PER_MODALITY_DEFAULTS = dict(modality_default_shape = None, channel_first_latent = False, add_modality_shape_tokens = True,
                              modality_loss_weight = 1., modality_downsample = 1, modality_unet_dim = None)


def _modality_configs(dim_latent, **keywords) -> tuple[ModalityConfig, ...]:
    """One ModalityConfig per entry of dim_latent, from the per-modality keywords (each one value
    for all modalities, or one per modality)."""
    if dim_latent is None:
        given = sorted(name for name, value in keywords.items() if value != _PER_MODALITY_DEFAULTS[name])
        _require(not given, f'{given} describe modalities, but there are none: pass dim_latent (one per modality)')
        return ()
    dims = tuple(dim_latent) if isinstance(dim_latent, (tuple, list)) else (dim_latent,)
    _require(len(dims) > 0, 'dim_latent must not be empty')
    count = len(dims)

    shape = keywords['modality_default_shape']
    if shape is None or _is_shape(shape):
        shapes = (_as_shape(shape, 'modality_default_shape'),) * count
    else:
        shapes = tuple(_as_shape(s, f'modality_default_shape[{i}]') for i, s in enumerate(
            _per_modality(shape, count, 'modality_default_shape', lambda v: False)))
    is_flag = lambda v: isinstance(v, bool)
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    columns = zip(dims, shapes,
                  _per_modality(keywords['channel_first_latent'], count, 'channel_first_latent', is_flag),
                  _per_modality(keywords['add_modality_shape_tokens'], count, 'add_modality_shape_tokens', is_flag),
                  _per_modality(keywords['modality_loss_weight'], count, 'modality_loss_weight', is_number),
                  _per_modality(keywords['modality_downsample'], count, 'modality_downsample', is_int),
                  _per_modality(keywords['modality_unet_dim'], count, 'modality_unet_dim', lambda v: v is None or is_int(v)))
    names = ('dim_latent', 'default_shape', 'channel_first', 'shape_tokens', 'loss_weight', 'downsample', 'unet_dim')
    # keywords given once, for every modality: a value that fits only some is the likely cause of an error
    given_once = [name for name, value in keywords.items() if value != _PER_MODALITY_DEFAULTS[name]
                  and (not isinstance(value, (tuple, list)) or (name == 'modality_default_shape' and _is_shape(value)))]
    hint = f'; {", ".join(given_once)} applied to every modality (a tuple gives one value per modality)' if given_once else ''
    return tuple(_modality_config(i, count, dict(zip(names, values)), hint) for i, values in enumerate(columns))


def _modality_config(index: int, count: int, values: dict, hint: str) -> ModalityConfig:
    try:
        return ModalityConfig(**values)
    except ValueError as error:
        if count == 1:
            raise
        raise ValueError(f'modality {index}: {error}{hint}') from None

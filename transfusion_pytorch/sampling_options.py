"""The keyword arguments of sampling and text generation: the options of a sampling call, checked
up front, and the parts of them that name modalities and shapes (forced starts, fixed shapes) or seed the rows.

Every check here runs before anything is sampled: a bad argument raises a ValueError or
TypeError naming it, never an error from deep inside a solve. A shape given for a modality is
held to the checks training applies to a latent of that shape (batch.canonical_latent), so a
sample is valid input as it is.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from . import flow


def is_real_number(value) -> bool:
    """A Python or NumPy real number, not a bool (which would pass for 0 or 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_flag(value, name: str) -> bool:
    """A bool or a NumPy bool, as a bool: a string such as 'no' would read as true."""
    kind = type(value)
    if not isinstance(value, bool) and not (kind.__module__ == 'numpy' and kind.__name__ in ('bool', 'bool_')):
        raise TypeError(f'{name} must be a bool, got {kind.__name__ if kind.__module__ == "builtins" else kind.__module__ + "." + kind.__name__}')
    return bool(value)


def check_text_sampling(temperature: float, min_p: float, temperature_name: str = 'temperature', min_p_name: str = 'min_p') -> None:
    """Temperature >= 0 (0 is greedy) and min-p in [0, 1]: a negative temperature would favour
    the least likely tokens (and the special tokens masked to -inf), a min-p above 1 keep none."""
    for name, value in ((temperature_name, temperature), (min_p_name, min_p)):
        if not is_real_number(value):
            raise TypeError(f'{name} must be a number, got {type(value).__name__}')
    if not 0 <= temperature < float('inf'):
        raise ValueError(f'{temperature_name} must be finite and >= 0 (0 is greedy), got {temperature}')
    if not 0 <= min_p <= 1:
        raise ValueError(f'{min_p_name} must lie in [0, 1], got {min_p}')


@dataclass
class SamplingOptions:
    max_length: int = 2048
    text_temperature: float = 1.
    text_min_p: float = 0.1
    modality_steps: int = 16
    ode_method: str = 'midpoint'
    cfg_scale: float = 1.
    cache_kv: bool = True
    fixed_modality_shape: dict[int, tuple[int, ...]] = field(default_factory = dict)
    show_progress: bool = True
    cuda_graphs: bool = True



def as_shape(value, argument: str) -> tuple[int, ...]:
    """A shape of positive Python or NumPy ints, as a tuple of Python ints."""
    if not isinstance(value, (tuple, list, torch.Size)) or not all(is_integer(a) and a > 0 for a in value):
        raise ValueError(f'{argument}: a shape must be a tuple of positive ints, got {value!r}')
    return tuple(int(a) for a in value)


def shape_problem(model, modality: int, shape: tuple[int, ...]) -> str | None:
    """Why `shape` cannot be sampled for `modality` (None if it can): the data-side checks of
    training (batch.canonical_latent), so a sample is valid input as it is."""
    spec = model.config.modalities[modality]
    if spec.num_axes is not None and len(shape) != spec.num_axes:
        return f'modality {modality} has {spec.num_axes} axes, got shape {shape}'
    if not spec.shape_tokens and shape != spec.default_shape:
        return f'modality {modality} has shape tokens off; its shape is fixed at {spec.default_shape}'
    if any(a % spec.downsample for a in shape):
        return f'shape {shape} for modality {modality} must be divisible by its downsample factor {spec.downsample}'
    if any(a > model.config.max_shape_value for a in shape):
        return f'shape {shape} for modality {modality} exceeds max_shape_value={model.config.max_shape_value}'
    return None


def fixed_shapes(model, fixed_modality_shape) -> dict[int, tuple[int, ...]]:
    """{modality: shape}: from a dict (each must fit its modality), or one shape for every
    modality it fits (at least one)."""
    count = model.config.num_modalities
    if fixed_modality_shape is None:
        return {}
    if not isinstance(fixed_modality_shape, dict):
        shape = as_shape(fixed_modality_shape, 'fixed_modality_shape')
        problems = [shape_problem(model, m, shape) for m in range(count)]
        if all(problems):
            raise ValueError(f'fixed_modality_shape {shape} fits no modality: ' + '; '.join(problems or ['the model has no modalities']))
        return {m: shape for m, problem in enumerate(problems) if problem is None}
    shapes = {}
    for m, value in fixed_modality_shape.items():
        if not is_integer(m):
            raise TypeError(f'fixed_modality_shape keys must be modality indices, got {m!r}')
        m = int(m)
        if not 0 <= m < count:
            raise ValueError(f'fixed_modality_shape names modality {m!r}, but the model has {count}')
        shapes[m] = as_shape(value, f'fixed_modality_shape[{m}]')
        if problem := shape_problem(model, m, shapes[m]):
            raise ValueError(f'fixed_modality_shape: {problem}')
    return shapes


def forced_start(model, value, argument: str = 'force_modality_at_start') -> tuple[int, tuple[int, ...] | None] | None:
    """force_modality_at_start as (modality, shape or None), checked; errors name `argument`."""
    if value is None:
        return None
    modality, shape = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
    if not is_integer(modality):
        raise TypeError(f'force_modality_at_start must be a modality index or (index, shape), got {value!r}')
    modality = int(modality)
    if not 0 <= modality < model.config.num_modalities:
        raise ValueError(f'force_modality_at_start names modality {modality}, but the model has {model.config.num_modalities}')
    if shape is not None:
        shape = as_shape(shape, argument)
        if problem := shape_problem(model, modality, shape):
            raise ValueError(f'{argument}: {problem}')
    return modality, shape


def check_options(options: SamplingOptions) -> None:
    for name, least in (('max_length', 2), ('modality_steps', 1)):
        value = getattr(options, name)
        if not is_integer(value):
            raise TypeError(f'{name} must be an int, got {type(value).__name__}')
        if value < least:
            raise ValueError(f'{name} must be at least {least}, got {value}')
    check_text_sampling(options.text_temperature, options.text_min_p, 'text_temperature', 'text_min_p')
    if not is_real_number(options.cfg_scale):
        raise TypeError(f'cfg_scale must be a number (1: no guidance), got {type(options.cfg_scale).__name__}')
    if not math.isfinite(options.cfg_scale):
        raise ValueError(f'cfg_scale must be finite (1: no guidance), got {options.cfg_scale}')
    flow.check_method(options.ode_method)
    for name in ('cache_kv', 'show_progress', 'cuda_graphs'):
        setattr(options, name, check_flag(getattr(options, name), name))
    # NumPy numbers pass the checks above; from here on they are plain Python numbers
    options.max_length, options.modality_steps = int(options.max_length), int(options.modality_steps)
    options.text_temperature, options.text_min_p = float(options.text_temperature), float(options.text_min_p)
    options.cfg_scale = float(options.cfg_scale)


def row_generators(seed, count: int, device) -> list:
    """One generator per row: seed (an int) seeds row r with seed + r; a list or tuple gives
    each row's seed."""
    if seed is None:
        return [None] * count
    if not isinstance(seed, (list, tuple)) and not is_integer(seed):
        raise TypeError(f'seed must be an int, or a list of ints (one per prompt), got {type(seed).__name__}')
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + r for r in range(count)]
    if len(seeds) != count:
        raise ValueError(f'got {len(seeds)} seeds for {count} prompts')
    for r, value in enumerate(seeds):
        if not is_integer(value) or not -2 ** 63 <= value < 2 ** 64:
            raise ValueError(f'the seed of prompt {r} must be an int in [-2**63, 2**64), got {value!r}')
    return [torch.Generator(device = device).manual_seed(int(s)) for s in seeds]

"""Debug mode: runtime shape and dtype checks (jaxtyping + beartype) on the public entry points.

Off by default. Set the environment variable before the package is imported:

    TRANSFUSION_DEBUG=1 python train.py

Then every function decorated with `typechecked` checks its arguments and its return value
against its annotations, including jaxtyping shapes (`Float[Tensor, 'b n d']`: a floating tensor
of three axes, with `b`, `n`, `d` consistent across all arguments of that one call). A violation
raises `jaxtyping.TypeCheckError` (a TypeError) whose message names the offending parameter,
shows its actual dtype and shape, the expected type and the sizes bound so far.

With the variable off, `typechecked` returns the function itself: no wrapper, no cost, no change
of behaviour. The variable is read once, at import time.

Annotations are contracts, not input validation: the library's own checks of user input (the
ValueError/TypeError messages naming sample and item, items.py) stay the first line. Arguments
that those checks validate with better messages (a batch, a prompt) are annotated broadly, so
debug mode never replaces a clear message with a generic one.

Inside `torch.compile` tracing the checks are skipped (the wrapped function runs as is), so
compiled steps see the same graph with debug mode on or off.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, Union

import jaxtyping
import torch
from torch import Tensor

ENV_VARIABLE = 'TRANSFUSION_DEBUG'
_OFF_VALUES = ('', '0', 'false', 'no', 'off')

# A training or prediction batch: text ids Int['b n'], modality-only rows Float['b ...'], or a
# list of samples. Only "a tensor or a sequence" is checked here: the library validates the rest
# with messages that name the problem (a 1-D id tensor: "expects token ids of shape (b, n)"; a
# bad item: its sample and item index), which a failed Int/Float hint would replace.
Batch = Union[Tensor, Sequence]

# Caller-given flow-matching times, one per modality instance: a real tensor Real['i'] (or 0-d
# for one instance), or a sequence of numbers; objective.checked_times checks the same rule.
Times = Union[jaxtyping.Real[Tensor, 'i'], jaxtyping.Real[Tensor, ''], Sequence, None]

# A sampling flag: a bool, or a NumPy bool, which sampling_options.check_flag also takes.
try:
    from numpy import bool_ as _numpy_bool
    Flag = Union[bool, _numpy_bool]
except ImportError:
    Flag = bool

Function = TypeVar('Function', bound = Callable)


def debug_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `environ` turns debug mode on: any value of TRANSFUSION_DEBUG except '', '0',
    'false', 'no' and 'off' (case-insensitive)."""
    return environ.get(ENV_VARIABLE, '').strip().lower() not in _OFF_VALUES


DEBUG = debug_enabled()


def typechecked(function: Function) -> Function:
    """Check `function`'s annotated arguments and return value when debug mode is on; otherwise
    return `function` unchanged."""
    return checked(function) if DEBUG else function


def checked(function: Function) -> Function:
    """`function` wrapped with jaxtyping + beartype checks, whatever the environment says.

    beartype runs with the PEP 484 numeric tower, so an int is accepted where a float is
    annotated (`cfg_scale = 3`), as the typing conventions of Python say."""
    from beartype import BeartypeConf, beartype
    from jaxtyping import jaxtyped

    typechecker = beartype(conf = BeartypeConf(is_pep484_tower = True))
    checking = jaxtyped(typechecker = typechecker)(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return function(*args, **kwargs)   # dynamo cannot trace the checker; eager calls check
        return checking(*args, **kwargs)

    wrapper.__typechecked__ = True
    return wrapper

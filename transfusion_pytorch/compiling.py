"""torch.compile as this package uses it: regions with room for their versions, and a loop that
skips re-checking guards nothing in it can change.

A compiled region (a block, the stack, an ODE evaluation) needs one compiled version per mode
it runs in; `compile_region` leaves room for them all. Dynamo keeps those versions on the code
object it compiles, so regions compile copies of their code: per model or decoder
(`with_own_code`) or, for the stack, per transformer configuration (`shared_code`). The text
decoder calls one compiled step per token with the same objects and only new values in its
buffers, so after the first token it skips the guards: `skip_guard_checks`.
"""
from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable
from contextlib import nullcontext

import torch

# Blocks share Block.forward, and each mode a block runs in needs its own compiled version:
# train or eval, gradients on or off, with or without a KV cache, the first block or a later
# one (value residual): up to 16, past torch's default recompile_limit of 8, beyond which a
# call needing a new version silently runs eagerly.
BLOCK_VERSIONS = 32


def compile_region(fn, options: dict | None, backend = None, **settings):
    """torch.compile with room for BLOCK_VERSIONS compiled versions: a recompile_limit for this
    region where torch.compile takes one, else torch._dynamo's global limit raised (never lowered).
    backend: a Dynamo backend in place of Inductor with `options` (which it then applies itself).
    settings: more torch.compile arguments (fullgraph, dynamic)."""
    how = dict(options = options, **settings) if backend is None else dict(backend = backend, **settings)
    if 'recompile_limit' in inspect.signature(torch.compile).parameters:
        return torch.compile(fn, recompile_limit = BLOCK_VERSIONS, **how)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, BLOCK_VERSIONS)
    return torch.compile(fn, **how)


def with_own_code(fn: Callable) -> Callable:
    """fn (a function or a bound method) as a copy with a code object and globals of its own.

    Dynamo keeps compiled versions on the code object, and a region compiled with a backend of
    its own (replay.RecordingInductor) or guarded on objects of its own (a text decoder's
    buffers) adds a version to that code object each time: 32 text decoders of new sizes, or 32
    models sampling, would exhaust the recompile limit of every later one (an error under
    fullgraph, eager code otherwise). On a copy, a region's versions are its own. Dynamo also
    stores each compiled graph in the function's globals (`__compiled_fn_*`), so the copy reads
    a snapshot of the module's globals: the graphs then go with the copy instead of piling up in
    the module. A snapshot is enough for the regions compiled here, whose globals are the
    module's imports and functions."""
    function = getattr(fn, '__func__', fn)
    copy = types.FunctionType(function.__code__.replace(), dict(function.__globals__), function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = function.__kwdefaults__, function.__qualname__, function.__doc__
    # the versions hang off the code object in Dynamo's C state, which outlives the function:
    # drop them with it (a torch without reset_code keeps them, as it keeps any code's)
    reset_code = getattr(torch._dynamo.eval_frame, 'reset_code', None)
    if reset_code is not None:
        weakref.finalize(copy, reset_code, copy.__code__)
    return types.MethodType(copy, fn.__self__) if hasattr(fn, '__func__') else copy


# (function, key) -> the copy of the function that every caller with that key compiles; an entry
# goes when no caller holds its copy any more, and the copy's versions with it (with_own_code)
_shared_copies: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_code(function: Callable, key) -> types.FunctionType:
    """A copy of `function` (see with_own_code) shared by every caller that gives an equal `key`,
    for as long as one of them holds it. The compiled stacks of all models of one transformer
    configuration (an EMA copy among them) use one such copy, so they share their versions, while
    another configuration fills a copy of its own: on one shared code object, a process that built
    models of a few configurations would use up the recompile limit, and later models' stacks would
    run eagerly. key: hashable (a frozen configuration)."""
    copy = _shared_copies.get((function, key))
    if copy is None:
        copy = with_own_code(function)
        _shared_copies[function, key] = copy
    return copy


def skip_guard_checks():
    """torch.compiler.set_stance(skip_guard_eval_unsafe=True): inside, a compiled call checks only
    the guards that tell its compiled versions apart, so use it only where nothing else a guard
    reads can change between the calls. A stance the caller set (force_eager, a forced backend)
    is kept: then, and on a torch without the option (set_stance came in torch 2.6; this package
    allows 2.5), it does nothing."""
    set_stance = getattr(torch.compiler, 'set_stance', None)
    current = getattr(getattr(torch._dynamo, 'eval_frame', None), '_stance', None)
    if set_stance is None or getattr(current, 'stance', None) != 'default' or getattr(current, 'backend', None) is not None:
        return nullcontext()
    try:
        return set_stance(skip_guard_eval_unsafe = True)
    except TypeError:   # a set_stance without the option
        return nullcontext()


"""Debug mode (TRANSFUSION_DEBUG=1): jaxtyping + beartype checks on the public entry points.

The variable is read at import time, so the end-to-end checks run in fresh subprocesses: with it
on, a wrong-shaped or wrong-typed argument raises jaxtyping's TypeCheckError naming that argument,
valid calls still work, and the library's own messages for bad user input still come out; with
it off, the entry points are the undecorated functions. (The whole suite also passes with the
variable on: `TRANSFUSION_DEBUG=1 pytest -q`.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from jaxtyping import Float, TypeCheckError
from torch import Tensor

from transfusion_pytorch import debug

# Each case is called in the subprocess; the report says which exception (if any) came out.
SCRIPT = r'''
import json, numpy, torch
from jaxtyping import TypeCheckError
from transfusion_pytorch import Transfusion, flow
from transfusion_pytorch.debug import DEBUG

torch.manual_seed(0)
model = Transfusion(num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2, 3), (3,)),
                    transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
batch = [[torch.randint(0, 16, (5,)), torch.randn(2, 3, 8)], [(1, torch.randn(4, 4)), torch.randint(0, 16, (2,))]]
packed = model.pack(batch)
inputs = [g.data for g in packed.groups]
field = lambda t, x: -x
quiet = dict(max_length = 16, modality_steps = 2, show_progress = False)

valid = {
    'forward mixed': lambda: model(batch, times = torch.rand(2)),
    'forward text-only': lambda: model(torch.randint(0, 16, (2, 6))),
    'forward modality-only': lambda: model(torch.randn(3, 2, 3, 8)),
    'predict': lambda: model.predict(batch, torch.rand(2)),
    'packed_hidden': lambda: model.packed_hidden(packed, inputs, torch.rand(2)),
    'sample': lambda: model.sample(**quiet),
    'generate_text_only': lambda: model.generate_text_only(torch.zeros(2, 1, dtype = torch.long), 4),
    'generate_modality_only': lambda: model.generate_modality_only(2, modality_steps = 2),
    'integrate': lambda: flow.integrate(field, torch.randn(2, 3), 2),
    'times as a list': lambda: model(batch, times = [0.3, 0.6]),
    'prompts as a tuple': lambda: model.sample_many((None, None), **quiet),
    'fixed shape as a list': lambda: model.generate_modality_only(1, fixed_modality_shape = [2, 3], modality_steps = 1),
    # the library's own checks take NumPy numbers, 0-d tensors and integer times: so must the annotations
    'NumPy numbers in sampling': lambda: model.sample(cfg_scale = numpy.float32(1.5), text_temperature = numpy.float64(.7),
                                                      **{**quiet, 'max_length': numpy.int64(16)}),
    'NumPy numbers in generate_text_only': lambda: model.generate_text_only(torch.zeros(1, 1, dtype = torch.long), numpy.int64(4),
                                                                            temperature = numpy.float32(.7), min_p = numpy.float32(.1)),
    'NumPy numbers in generate_modality_only': lambda: model.generate_modality_only(numpy.int64(1), numpy.int64(0), modality_steps = numpy.int64(1)),
    'times as 0-d tensors': lambda: model(batch, times = [torch.tensor(.3), torch.tensor(.6)]),
    'times as integers': lambda: model(batch, times = torch.tensor([0, 1])),
}
wrong = {   # name of the argument the message must name -> a call with that argument wrong
    'times': lambda: model(batch, times = torch.rand(2, 1)),
    'ids': lambda: model.text_logits(torch.zeros(5, dtype = torch.long)),
    'x': lambda: model.transformer(torch.randn(5, 32), torch.arange(5)[None], None),
    'positions': lambda: model.transformer(torch.randn(1, 5, 32), torch.arange(4)[None], None),
    'group_inputs': lambda: model.packed_hidden(packed, [g.data.flatten() for g in packed.groups], torch.rand(2)),
    'noise': lambda: flow.integrate(field, torch.zeros(2, 3, dtype = torch.long), 2),
    'steps': lambda: flow.integrate(field, torch.randn(2, 3), '2'),
    'max_length': lambda: model.sample(max_length = '16', show_progress = False),
    'batch_size': lambda: model.generate_modality_only(2.5),
    'seq_len': lambda: model.generate_text_only(torch.zeros(2, 1, dtype = torch.long), '4'),
}
library = {   # user errors the library explains itself, in debug mode too
    'a batch must be a list of samples': lambda: model('text'),
    'expects token ids of shape': lambda: model(torch.tensor([1, 2, 3])),
    'sample 0, item 1: text id 99': lambda: model([[torch.tensor([1]), torch.tensor([99])]]),
    'a prompt must be a tensor, a (modality_index, tensor) pair or a list of items': lambda: model.sample(3.0),
}

def outcome(call):
    try:
        call()
        return None
    except Exception as error:
        return [type(error).__name__, isinstance(error, TypeCheckError), str(error)]

print(json.dumps(dict(
    debug = DEBUG,
    valid = {k: outcome(f) for k, f in valid.items()},
    wrong = {k: outcome(f) for k, f in wrong.items()},
    library = {k: outcome(f) for k, f in library.items()},
    decorated = [name for name in ('forward', 'predict', 'sample', 'sample_many', 'generate_text_only',
                                   'generate_modality_only', 'packed_hidden', 'text_logits')
                 if hasattr(getattr(Transfusion, name), '__typechecked__')]
              + (['Transformer.forward'] if hasattr(type(model.transformer).forward, '__typechecked__') else [])
              + [f'flow.{name}' for name in ('integrate', 'noised', 'velocity_target') if hasattr(getattr(flow, name), '__typechecked__')],
)))
'''


def run_script(value: str) -> dict:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', debug.ENV_VARIABLE: value}
    result = subprocess.run([sys.executable, '-c', SCRIPT], capture_output = True, text = True, timeout = 120, env = env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_debug_mode_names_the_wrong_argument_and_keeps_library_messages():
    report = run_script('1')
    assert report['debug'] is True
    assert len(report['decorated']) == 12, report['decorated']
    failed_valid = {k: v for k, v in report['valid'].items() if v is not None}
    assert not failed_valid, failed_valid
    for argument, error in report['wrong'].items():
        assert error is not None, f'a wrong {argument!r} passed unnoticed'
        name, is_typecheck_error, message = error
        assert is_typecheck_error, f'{argument}: {name}: {message[:500]}'
        assert f"parameter '{argument}'" in message, message[:500]
    for expected, error in report['library'].items():
        assert error is not None and not error[1] and expected in error[2], (expected, error)


def test_debug_mode_off_leaves_the_functions_undecorated():
    report = run_script('0')
    assert report['debug'] is False and report['decorated'] == []
    assert all(v is None for v in report['valid'].values()), report['valid']
    for expected, error in report['library'].items():
        assert error is not None and expected in error[2], (expected, error)


@pytest.mark.parametrize('value, on', [('1', True), ('true', True), ('yes', True), ('', False), ('0', False),
                                       ('false', False), ('OFF', False), (' no ', False)])
def test_the_variable_is_parsed(value, on):
    assert debug.debug_enabled({debug.ENV_VARIABLE: value}) is on
    assert debug.debug_enabled({}) is False


def scale(x: Float[Tensor, 'b n'], factor: float) -> Float[Tensor, 'b n']:
    return x * factor


def test_typechecked_is_the_identity_when_off(monkeypatch):
    monkeypatch.setattr(debug, 'DEBUG', False)
    assert debug.typechecked(scale) is scale
    monkeypatch.setattr(debug, 'DEBUG', True)
    assert debug.typechecked(scale) is not scale and debug.typechecked(scale).__wrapped__ is scale


def test_checked_accepts_int_for_float_and_rejects_wrong_shapes():
    checked = debug.checked(scale)
    torch.testing.assert_close(checked(torch.ones(2, 3), 2), torch.full((2, 3), 2.))   # PEP 484 numeric tower
    with pytest.raises(TypeCheckError, match = "parameter 'x'"):
        checked(torch.ones(2, 3, 4), 2.)
    with pytest.raises(TypeCheckError, match = "parameter 'factor'"):
        checked(torch.ones(2, 3), 'two')

    def transposed(x: Float[Tensor, 'b n']) -> Float[Tensor, 'b n']:
        return x.T
    with pytest.raises(TypeCheckError, match = 'return value'):
        debug.checked(transposed)(torch.ones(2, 3))


def test_checks_step_aside_inside_torch_compile():
    """dynamo cannot trace the checker; a fullgraph compile must still succeed and agree."""
    torch._dynamo.reset()
    compiled = torch.compile(debug.checked(scale), fullgraph = True, backend = 'eager')
    x = torch.randn(2, 3)
    torch.testing.assert_close(compiled(x, 3.), 3. * x)

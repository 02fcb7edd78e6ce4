"""Replaying a compiled region's graph past torch.compile (replay.py): later calls equal eager
calls with their own inputs, in-place writes included, and skip torch.compile; a changed input
signature or mode goes through torch.compile again; a graph break or an argument made anew each
call is never replayed."""
import pytest
import torch

from transfusion_pytorch.replay import Replayed, recorded_region


def step(x, t, weight, state):
    """A region like an ODE evaluation: reads closed-over tensors, writes one in place."""
    state.copy_(x[:, :1])
    return torch.tanh(x @ weight) * t + state


def broken_step(x, t, weight, state):
    hidden = x @ weight
    torch._dynamo.graph_break()   # two graphs a call
    return torch.tanh(hidden) * t + state


@torch._dynamo.disable
def eager_identity(hidden):
    return hidden.clone()


def step_ending_eagerly(x, t, weight, state):
    return eager_identity(torch.tanh(x @ weight) * t + state)   # one graph, then eager work on its output


def make(fn = step, fresh_argument = False):
    weight, state = torch.randn(4, 4), torch.zeros(3, 1)
    region = recorded_region(fn, None)
    if fresh_argument:   # a tensor made anew each call, outside the region
        call = lambda x, t: region.fn(x, t, weight, state.clone())
    else:
        call = lambda x, t: region.fn(x, t, weight, state)
    return Replayed(call, region, torch.device('cpu')), region, weight, state


def check_against_eager(replayed, weight, state, shape = (3, 4)):
    x, t = torch.randn(shape), torch.rand(())
    got = replayed(x, t)
    torch.testing.assert_close(state, x[:, :1])   # the in-place write happened
    torch.testing.assert_close(got, torch.tanh(x @ weight) * t + x[:, :1])


def test_later_calls_skip_torch_compile_and_equal_eager():
    torch._dynamo.reset()
    replayed, region, weight, state = make()
    for call in range(6):
        region.recorder.calls = 0
        check_against_eager(replayed, weight, state)
        assert (replayed.plan is not None) == (call >= 1)
        assert region.recorder.calls == (0 if call >= 2 else 1)   # from the third call on: the graph, directly


@pytest.mark.parametrize('change', ['stride', 'view', 'grad'])
def test_a_changed_signature_goes_through_torch_compile(change):
    torch._dynamo.reset()
    replayed, region, weight, state = make()
    with torch.no_grad():
        for _ in range(3):
            check_against_eager(replayed, weight, state)
    assert replayed.plan is not None
    region.recorder.calls = 0
    if change in ('stride', 'view'):   # the same shape, transposed in memory; a view of a larger tensor
        x, t = torch.randn(4, 3).T if change == 'stride' else torch.randn(4, 4)[1:], torch.rand(())
        with torch.no_grad():
            got = replayed(x, t)
        torch.testing.assert_close(got, torch.tanh(x @ weight) * t + x[:, :1])
    else:   # recorded without gradients: a replay would cut the autograd graph
        x = torch.randn(3, 4, requires_grad = True)
        replayed(x, torch.rand(())).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert region.recorder.calls == 1


@pytest.mark.parametrize('fn', [broken_step, step_ending_eagerly])
def test_a_graph_break_is_never_replayed(fn):
    torch._dynamo.reset()
    replayed, region, weight, state = make(fn)
    for _ in range(4):
        x, t = torch.randn(3, 4), torch.rand(())
        torch.testing.assert_close(replayed(x, t), torch.tanh(x @ weight) * t + state)
    assert replayed.plan is None


def test_an_argument_made_anew_each_call_is_never_replayed():
    torch._dynamo.reset()
    replayed, region, weight, state = make(fresh_argument = True)
    for _ in range(4):
        x, t = torch.randn(3, 4), torch.rand(())
        got = replayed(x, t)
        torch.testing.assert_close(got, torch.tanh(x @ weight) * t + x[:, :1])
    assert replayed.plan is None


def plain_step(x, t, weight, state):
    """A region without in-place writes, whose inputs may change shape or dtype."""
    return torch.tanh(x @ weight.to(x.dtype)) * t


@pytest.mark.parametrize('change', ['shape', 'dtype', 'autocast'])
def test_another_shape_dtype_or_autocast_goes_through_torch_compile(change):
    """Recorded on fp32 (3, 4) inputs without autocast: 5 rows (the graph is specialised for 3),
    float64 (a replay would hand it to a float32 kernel) or bf16 autocast (whose product is bf16)
    go through torch.compile, and equal eager."""
    torch._dynamo.reset()
    replayed, region, weight, state = make(plain_step)
    for _ in range(3):
        x, t = torch.randn(3, 4), torch.rand(())
        torch.testing.assert_close(replayed(x, t), plain_step(x, t, weight, state))
    assert replayed.plan is not None
    region.recorder.calls = 0
    x, t = torch.randn(5 if change == 'shape' else 3, 4), torch.rand(())
    if change == 'dtype':
        x, t = x.double(), t.double()
    with torch.autocast('cpu', dtype = torch.bfloat16, enabled = change == 'autocast'):
        got, expected = replayed(x, t), plain_step(x, t, weight, state)
    assert got.shape == expected.shape and got.dtype == expected.dtype and region.recorder.calls == 1
    torch.testing.assert_close(got, expected)


def two_graphs_through_state(x, t, weight, state):
    state.copy_(torch.tanh(x @ weight)[:, :1])    # first graph: writes the region's own tensor
    torch._dynamo.graph_break()
    return x * t + state                         # second graph: takes x, t and state as they were


def test_a_graph_break_whose_last_graph_takes_the_inputs_is_never_replayed():
    """Replaying the last of two graphs would skip the first one's write."""
    torch._dynamo.reset()
    replayed, region, weight, state = make(two_graphs_through_state)
    for _ in range(4):
        x, t = torch.randn(3, 4), torch.rand(())
        torch.testing.assert_close(replayed(x, t), x * t + torch.tanh(x @ weight)[:, :1])
    assert replayed.plan is None

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


def plain_step(x, t, weight):
    return torch.tanh(x @ weight.to(x.dtype)) * t


def replayed_plain():
    torch._dynamo.reset()
    weight = torch.randn(4, 4)
    region = recorded_region(plain_step, None)
    replayed = Replayed(lambda x, t: region.fn(x, t, weight), region, torch.device('cpu'))
    for _ in range(3):
        x, t = torch.randn(3, 4), torch.rand(())
        torch.testing.assert_close(replayed(x, t), plain_step(x, t, weight))
    assert replayed.plan is not None
    region.recorder.calls = 0
    return replayed, region, weight


def test_an_input_of_another_shape_goes_through_torch_compile():
    """Same strides as the recorded (3, 4) input, another row count: the recorded graph was
    specialised for 3 rows, so the call must go through torch.compile and equal eager."""
    replayed, region, weight = replayed_plain()
    x, t = torch.randn(5, 4), torch.rand(())
    got = replayed(x, t)
    assert got.shape == (5, 4) and region.recorder.calls == 1
    torch.testing.assert_close(got, plain_step(x, t, weight))


def test_an_input_of_another_dtype_goes_through_torch_compile():
    """The recorded layout in float64: a replay would hand float64 data to a float32 kernel."""
    replayed, region, weight = replayed_plain()
    x, t = torch.randn(3, 4, dtype = torch.float64), torch.rand((), dtype = torch.float64)
    got = replayed(x, t)
    assert got.dtype == torch.float64 and region.recorder.calls == 1
    torch.testing.assert_close(got, plain_step(x, t, weight))


def test_a_call_under_autocast_goes_through_torch_compile():
    """Recorded without autocast; under bf16 autocast the product is bf16 (as eagerly), which a
    replay of the fp32 graph would not give."""
    replayed, region, weight = replayed_plain()
    x, t = torch.randn(3, 4), torch.rand(())
    with torch.autocast('cpu', dtype = torch.bfloat16):
        got, expected = replayed(x, t), plain_step(x, t, weight)
    assert got.dtype == expected.dtype == torch.bfloat16 and region.recorder.calls == 1
    torch.testing.assert_close(got, expected)


def two_graphs_through_state(x, t, weight, state):
    state.copy_(torch.tanh(x @ weight)[:, :1])    # first graph: writes the region's own tensor
    torch._dynamo.graph_break()
    return x * t + state                         # second graph: takes x, t and state as they were


def test_a_graph_break_whose_last_graph_takes_the_inputs_is_never_replayed():
    """Replaying the last of two graphs would skip the first one's write."""
    torch._dynamo.reset()
    weight, state = torch.randn(4, 4), torch.zeros(3, 1)
    region = recorded_region(two_graphs_through_state, None)
    replayed = Replayed(lambda x, t: region.fn(x, t, weight, state), region, torch.device('cpu'))
    for _ in range(4):
        x, t = torch.randn(3, 4), torch.rand(())
        torch.testing.assert_close(replayed(x, t), x * t + torch.tanh(x @ weight)[:, :1])
    assert replayed.plan is None

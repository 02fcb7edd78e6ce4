"""Flow matching path, target and ODE integration against analytic answers."""
import math

import pytest
import torch

from transfusion_pytorch import flow


def test_path_endpoints_and_target():
    data, noise = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(flow.noised(data, noise, torch.zeros(5)), noise)       # t = 0 is noise
    assert torch.equal(flow.noised(data, noise, torch.ones(5)), data)         # t = 1 is data
    t = torch.rand(5)
    eps = 1e-3
    numeric = (flow.noised(data, noise, t + eps) - flow.noised(data, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(numeric, flow.velocity_target(data, noise), atol = 1e-3, rtol = 1e-3)


@pytest.mark.parametrize('method, steps, tolerance', [('euler', 400, 5e-3), ('midpoint', 16, 1e-3), ('heun2', 16, 1e-3), ('heun3', 8, 1e-4),
                                                       ('rk4', 8, 1e-5), ('dopri5', 1, 1e-4)])
def test_integration_matches_an_analytic_field(method, steps, tolerance):
    """dx/dt = -x * 2t has x(1) = x(0) * exp(-1)."""
    x0 = torch.randn(4, 6)
    calls = []
    def field(t, x):
        calls.append(1)
        return -2 * t * x
    x1 = flow.integrate(field, x0, steps, method)
    torch.testing.assert_close(x1, x0 * math.exp(-1), atol = tolerance, rtol = tolerance)
    if method in flow.EVALUATIONS_PER_STEP:
        assert len(calls) == steps * flow.EVALUATIONS_PER_STEP[method]


def test_straight_field_is_solved_exactly_by_euler_in_one_step():
    """For a single data point the optimal field is x1 - noise everywhere: one Euler step lands on it."""
    data, noise = torch.randn(3, 2), torch.randn(3, 2)
    field = lambda t, x: (data - x) / (1 - t).clamp(min = 1e-6)
    torch.testing.assert_close(flow.integrate(field, noise, 1, 'euler'), data)


def test_time_sampling_ranges_and_distributions():
    generator = torch.Generator().manual_seed(0)
    for method in ('uniform', 'logit_normal'):
        t = flow.sample_times(20_000, method, torch.device('cpu'), generator)
        assert ((t >= 0) & (t <= 1)).all()
    uniform = flow.sample_times(20_000, 'uniform', torch.device('cpu'), generator)
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - 12 ** -0.5) < 0.01
    logits = flow.sample_times(20_000, 'logit_normal', torch.device('cpu'), generator).logit()   # a standard normal
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
    times = torch.tensor([0., .5, 1., .2])
    limited = flow.limit_noise(times, torch.tensor([True, True, True, False]))
    assert torch.equal(limited, torch.tensor([.5, .75, 1., .2]))      # [0, 1] onto [0.5, 1], the others kept
    with pytest.raises(ValueError, match = 'time sampling'):
        flow.sample_times(3, 'beta', torch.device('cpu'))


def test_integration_needs_a_step():
    with pytest.raises(ValueError, match = 'modality_steps must be at least 1, got 0'):
        flow.integrate(lambda t, x: x, torch.zeros(2), 0, 'euler')


def test_adaptive_solvers_follow_their_tolerances():
    """dopri5 chooses its steps from rtol/atol: loose tolerances take fewer evaluations, tight ones
    land closer to the analytic x(1) = x(0) * exp(sin(6))."""
    x0 = torch.randn(4, dtype = torch.float64)
    results = {}
    for tolerance in (1e-2, 1e-9):
        calls = []
        def field(t, x):
            calls.append(1)
            return 6 * torch.cos(6 * t) * x
        x1 = flow.integrate(field, x0, 1, 'dopri5', rtol = tolerance, atol = tolerance)
        results[tolerance] = (len(calls), (x1 - x0 * math.exp(math.sin(6))).abs().max().item())
    (loose_calls, loose_error), (tight_calls, tight_error) = results[1e-2], results[1e-9]
    assert loose_calls < tight_calls and tight_error < 1e-6 < loose_error, results


def test_the_path_keeps_the_data_dtype():
    data, noise = torch.randn(4, 3, dtype = torch.bfloat16), torch.randn(4, 3, dtype = torch.bfloat16)
    assert flow.noised(data, noise, torch.rand(4)).dtype == torch.bfloat16
    assert flow.noised(data.double(), noise.double(), torch.rand(4)).dtype == torch.float64


@pytest.mark.parametrize('method', ['euler', 'midpoint', 'heun3', 'rk4', 'explicit_adams'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_evaluation_times_are_the_times_a_solve_passes(method, dtype):
    """Recorded once from dx/dt = 0, they are the values of t that a solve of another field,
    of the state's dtype, passes, in the order of first use: what the samplers look them up by."""
    passed = {}
    def field(t, x):
        passed.setdefault(t.item())
        return -2 * t * x + 1
    flow.integrate(field, torch.randn(3, 2, dtype = dtype), 5, method)
    assert flow.evaluation_times(5, method, dtype) == tuple(passed)
    assert flow.evaluation_times(5, 'dopri5', dtype) == ()          # adaptive: depends on the field


# torchdiffeq's implicit Adams methods warn that their corrector did not converge at these step
# sizes; both solves here take the same steps, so they agree all the same
@pytest.mark.filterwarnings('ignore:Functional iteration did not converge')
@pytest.mark.parametrize('method', flow.FIXED_GRID_METHODS)
def test_a_fixed_grid_solve_equals_torchdiffeqs_solve_over_every_step(method):
    """integrate gives torchdiffeq the steps as its grid and asks for x(1) alone: the same
    evaluations, in the same order, as asking for the state at every step, so the same x(1) bit
    for bit."""
    from torchdiffeq import odeint
    x0 = torch.randn(4, 6)
    field = lambda t, x: torch.sin(3 * t) * x + t
    every_step = odeint(field, x0, torch.linspace(0., 1., 8), method = method)
    assert torch.equal(flow.integrate(field, x0, 7, method), every_step[-1])

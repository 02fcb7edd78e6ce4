"""Consistency flow matching (consistency.py) against analytic answers.

A model whose velocity head has zero weights predicts a constant velocity c whatever x and t
(the transformer still runs and still sees t). On data x1 = noise + c the straight path has
velocity c everywhere, so f(t, x_t) = x_t + (1 - t) c = noise + c is the same point all along it:
the loss must vanish. Off that path, or against a different EMA, it has a closed form.
"""
from __future__ import annotations

import pytest
import torch
from torch import randint, randn

from transfusion_pytorch.checkpoint import make_ema
from transfusion_pytorch.consistency import consistency_flow_loss

from conftest import tiny_model

SHAPES = [(0, (2, 3, 8)), (1, (4, 4)), (0, (1, 2, 8))]   # (modality, latent shape) of each instance


def constant_velocity(model) -> list[torch.Tensor]:
    """Zero the velocity heads' weights: modality m then predicts its bias c_m everywhere."""
    with torch.no_grad():
        for projection in model.modalities.projections:
            projection.proj_out.weight.zero_()
            projection.proj_out.bias.normal_()
    return [p.proj_out.bias.detach().clone() for p in model.modalities.projections]


def batch_of(latents: list[torch.Tensor]) -> list:
    """The three instances of SHAPES with text around them, in two samples."""
    return [[randint(0, 16, (5,)), latents[0], randint(0, 16, (3,))],
            [(1, latents[1]), randint(0, 16, (2,)), (0, latents[2])]]


def draws(delta: float):
    noise = [randn(shape) for _, shape in SHAPES]
    times = torch.rand(len(SHAPES)) * (1 - delta)
    return noise, times


@pytest.mark.parametrize('use_ema', [True, False])
def test_zero_when_the_ema_equals_the_model_and_the_field_is_straight(use_ema):
    model = tiny_model()
    velocity = constant_velocity(model)
    teacher = make_ema(model) if use_ema else model
    noise, times = draws(delta = 0.2)
    data = [n + velocity[m] for (m, _), n in zip(SHAPES, noise)]       # on the straight path of velocity c
    loss = consistency_flow_loss(model, teacher, batch_of(data), delta = 0.2, alpha = 1., times = times, noise = noise)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() < 1e-11, loss.item()


@pytest.mark.parametrize('on_path, ema_shift, alpha', [(False, 0., 0.), (False, 0.3, 0.5), (True, 0.3, 2.)])
def test_matches_the_closed_form(on_path, ema_shift, alpha):
    """f_s - f_e = [n + t d + (1 - t) c] - [n + (t + delta) d + (1 - t - delta) c'], d = x1 - n,
    v_s - v_e = c - c': holds only if both evaluations share the noise and sit delta apart."""
    delta = 0.1
    model = tiny_model()
    c = constant_velocity(model)
    ema = make_ema(model)
    with torch.no_grad():
        for projection in ema.module.modalities.projections:
            projection.proj_out.bias.add_(ema_shift)
    c_ema = [b + ema_shift for b in c]
    noise, times = draws(delta)
    data = [n + c[m] if on_path else randn(n.shape) for (m, _), n in zip(SHAPES, noise)]
    loss = consistency_flow_loss(model, ema, batch_of(data), delta = delta, alpha = alpha, times = times, noise = noise)

    squared = {0: [], 1: []}
    for (m, _), n, x1, t in zip(SHAPES, noise, data, times.double()):
        n, d = n.double(), (x1 - n).double()
        f_s = n + t * d + (1 - t) * c[m].double()
        f_e = n + (t + delta) * d + (1 - t - delta) * c_ema[m].double()
        v = (c[m] - c_ema[m]).double().expand_as(n)
        squared[m].append(((f_s - f_e) ** 2).flatten() + alpha * (v ** 2).flatten())
    expected = sum(torch.cat(parts).mean() for parts in squared.values()) / 2     # equal loss weights
    assert expected > 1e-4                                                           # a case that is not zero
    torch.testing.assert_close(loss.double(), expected, rtol = 1e-4, atol = 1e-9)


def test_positive_for_a_real_model_with_gradients_only_on_the_student():
    model = tiny_model()
    ema = make_ema(model)
    batch = batch_of([randn(shape) for _, shape in SHAPES])
    loss = consistency_flow_loss(model, ema, batch, delta = 0.05, alpha = 1.)
    assert loss.item() > 1e-6                 # a random network's velocity depends on t
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ('modalities.projections.0.proj_out.weight', 'modalities.projections.1.proj_in.weight',
                 'transformer.blocks.0.attn_norm.gain', 'modalities.time_embedding.mlp.0.weight'):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(p.grad is None for p in ema.parameters())


def test_dropout_is_off_in_both_evaluations_and_the_modes_are_restored():
    """Both evaluations run as `predict` does: with dropout 0.5 in training mode the loss is still
    a deterministic function of the weights, times and noise."""
    model = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, dropout = 0.5)).train()
    ema = make_ema(model)
    batch = batch_of([randn(shape) for _, shape in SHAPES])
    noise, times = draws(0.01)
    first, second = (consistency_flow_loss(model, ema, batch, delta = 0.01, times = times, noise = noise) for _ in range(2))
    assert first.item() > 0 and torch.equal(first, second)
    assert model.training and ema.module.training


def test_text_only_batches_give_zero():
    model = tiny_model()
    assert consistency_flow_loss(model, model, randint(0, 16, (2, 6))).item() == 0.


@pytest.mark.parametrize('keywords, error, message', [
    (dict(delta = 0.), ValueError, r'delta must be in \(0, 1\)'),
    (dict(delta = '0.1'), TypeError, 'delta must be a number, got str'),
    (dict(alpha = -1.), ValueError, r'alpha \(the weight of the velocity term\) must be finite and >= 0, got -1.0'),
    (dict(alpha = float('nan')), ValueError, 'alpha .* must be finite and >= 0, got nan'),
    (dict(delta = 0.5, times = torch.tensor([0.1, 0.7, 0.2])), ValueError, r'times must lie in \[0, 1 - delta'),
    (dict(times = torch.tensor([False, True, False])), TypeError, 'times must be real numbers, got a tensor of torch.bool'),
    (dict(times = [0.1, 0.2]), ValueError, r'times must hold one value per modality instance \(3\), got 2'),
    (dict(times = [0.1, 0.2, 0.3], noise = [randn(2, 3, 8)]), ValueError, r'noise must hold one tensor per modality instance \(3\), got 1'),
], ids = ['delta_zero', 'delta_str', 'alpha_negative', 'alpha_nan', 'times_past_1_minus_delta', 'bool_times', 'times_count', 'noise_count'])
def test_bad_arguments_are_refused_before_anything_is_drawn(keywords, error, message):
    """Each is refused with a named message, and the global generator is where it was: a
    rejected call draws no times or noise."""
    model = tiny_model()
    batch = batch_of([randn(shape) for _, shape in SHAPES])
    state = torch.get_rng_state()
    with pytest.raises(error, match = message):
        consistency_flow_loss(model, model, batch, **keywords)
    assert torch.equal(state, torch.get_rng_state())


def test_the_ema_must_have_the_model_s_architecture():
    """Another width would give a loss against a different network; runtime options (compile,
    attention backend) change no weights and are allowed."""
    model = tiny_model()
    batch = randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match = r'ema_model must be an EMA of model .* they differ in transformer.dim: ema 48, model 64'):
        consistency_flow_loss(model, tiny_model(transformer = dict(dim = 48, depth = 2, heads = 2, dim_head = 32)), batch)
    with pytest.raises(TypeError, match = 'ema_model must be make_ema\\(model\\) or a Transfusion, got Linear'):
        consistency_flow_loss(model, torch.nn.Linear(2, 2), batch)
    other_backend = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'sdpa', checkpoint_activations = True))
    assert torch.isfinite(consistency_flow_loss(model, other_backend, batch))


def test_a_complex_batch_is_refused_not_read_as_text():
    with pytest.raises(TypeError, match = 'sample 0, item 0: modality 0 data must be a floating tensor, got tensor of dtype torch.complex64'):
        consistency_flow_loss(tiny_model(), tiny_model(), randn(2, 2, 3, 8, dtype = torch.complex64))


def test_refused_times_leave_a_trainable_encoder_s_buffers_as_they_were():
    """The times are checked after the batch is encoded (their count is the batch's number of
    instances); the encoder's state is handed back when they are refused."""
    from torch import nn

    class CallCounting(nn.Conv2d):
        def __init__(self):
            super().__init__(3, 8, 1)
            self.register_buffer('calls', torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    model = tiny_model(dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = CallCounting(), train_modality_encoders = True)
    encoder = model.modalities.encoders[0]
    with pytest.raises(ValueError, match = r'times must lie in \[0, 1 - delta'):
        consistency_flow_loss(model, model, randn(2, 3, 2, 2), times = [0.5, 1.])
    assert encoder.calls.item() == 0
    consistency_flow_loss(model, model, randn(2, 3, 2, 2))
    assert encoder.calls.item() == 1


def test_a_tiny_training_run_with_the_loss_stays_finite():
    model = tiny_model()
    ema = make_ema(model, decay = 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    start = [p.detach().clone() for p in ema.module.parameters()]
    images = randn(6, 2, 3, 8)
    for step in range(8):
        batch = images if step % 2 else batch_of([randn(shape) for _, shape in SHAPES])
        consistency = consistency_flow_loss(model, ema, batch, delta = 0.01)
        loss = model(batch) + consistency
        assert torch.isfinite(loss) and torch.isfinite(consistency), step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(start, ema.module.parameters())]
    assert sum(moved) > len(moved) // 2       # the EMA follows the student


def test_the_batch_is_encoded_once_for_both_evaluations():
    """Student and EMA see the same latents x1 (so the same x_t), from one encoder run in eval
    mode; a real VAE encoder is the expensive part of a step."""
    from torch import nn
    calls = []

    class Counting(nn.Conv2d):
        def forward(self, x):
            calls.append(self.training)
            return super().forward(x)

    model = tiny_model(dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2), modality_encoder = Counting(3, 8, 1))
    loss = consistency_flow_loss(model, make_ema(model), randn(2, 3, 2, 2))
    assert calls == [False] and torch.isfinite(loss)


def test_consistency_loss_weighs_modalities_by_their_loss_weight():
    """Per-modality parts are averaged with the modalities' loss weights, as the flow loss is:
    with weights (1, 3), loss = (L0 + 3 L1) / 4. A head that outputs a constant velocity c_m
    (zero weights, random bias) makes each part L_m a closed form of noise, data, times and c_m."""
    delta = 0.1
    model = tiny_model(modality_loss_weight = (1., 3.))
    constant_velocity(model)
    shapes = [(0, (2, 3, 8)), (1, (4, 4))]
    noise = [randn(s) for _, s in shapes]
    data = [randn(s) for _, s in shapes]
    times = torch.tensor([0.2, 0.5])
    batch = [[torch.randint(0, 16, (3,)), data[0], (1, data[1])]]
    loss = consistency_flow_loss(model, model, batch, delta = delta, alpha = 0., times = times, noise = noise)
    parts = [(((t + delta) - t) * (x1 - n) - delta * c.proj_out.bias).pow(2).mean()     # f_s - f_e = -delta d + delta c
             for n, x1, t, c in zip(noise, data, times, model.modalities.projections)]
    torch.testing.assert_close(loss, (parts[0] + 3 * parts[1]) / 4, rtol = 1e-4, atol = 1e-7)


def test_consistency_defaults_are_the_documented_delta_and_alpha():
    """Defaults delta = 1e-3 and alpha = 1e-5 (the module docstring: the authors' CIFAR-10
    values): the loss without them equals the loss with them, and each other value differs."""
    model = tiny_model()
    torch.manual_seed(1)
    other = tiny_model()                       # a Transfusion of the same config, other weights
    batch = randn(2, 2, 3, 8)
    times, noise = torch.tensor([0.2, 0.6]), [randn(2, 3, 8), randn(2, 3, 8)]
    loss = lambda **kw: consistency_flow_loss(model, other, batch, times = times, noise = noise, **kw)
    default = loss()
    assert torch.equal(default, loss(delta = 1e-3, alpha = 1e-5))
    assert not torch.equal(default, loss(delta = 1e-2, alpha = 1e-5))
    assert not torch.equal(default, loss(delta = 1e-3, alpha = 1e-3))

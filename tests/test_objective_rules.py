"""Rules of the training objective and token layout that the other tests left open (found by
mutating objective.py, flow.py, consistency.py and token_layout.py):

- the flow MSE of a modality is the mean over all its latent elements, pooled across its
  instances (not a mean of per-instance means);
- modalities are averaged with the loss weights of the modalities PRESENT in the batch, in the
  flow loss and in the consistency loss alike;
- drawn noise is standard normal, in training and in the consistency loss, and conditions are
  dropped at the configured rate;
- the consistency loss draws its default times in [0, 1 - delta] and evaluates the EMA at
  times + delta with the same noise;
- the consistency loss encodes the batch with a trainable encoder in eval mode, as predict does;
- the adaptive ODE solvers receive rtol and atol as given (not swapped);
- flex tile padding stays a causal document of its own under condition dropout.
"""
from __future__ import annotations

import math

import torch
from torch import nn, randint, randn

from transfusion_pytorch import flow, objective
from transfusion_pytorch.checkpoint import make_ema
from transfusion_pytorch.consistency import consistency_flow_loss

from conftest import tiny_model
from test_consistency import constant_velocity


# the flow loss

def test_flow_loss_of_a_modality_pools_the_elements_of_all_its_instances():
    """Two modality-0 instances of different sizes (6 and 2 tokens): the modality's flow loss is
    the MSE over their 8 * 8 latent elements together, rebuilt from predict()'s velocities and
    targets; a mean of the two per-instance MSEs would weigh the small instance 3x too much."""
    model = tiny_model(text_loss_weight = 0.5, flow_loss_weight = 2.).eval()
    batch = [[randint(0, 16, (3,)), randn(2, 3, 8), randint(0, 16, (2,)), (1, randn(5, 4))],
             [(0, randn(1, 2, 8)), randint(0, 16, (4,))]]
    times, noise = torch.tensor([.2, .7, .5]), [randn(2, 3, 8), randn(5, 4), randn(1, 2, 8)]
    pred = model.predict(batch, times, noise)
    loss, parts = model(batch, times = times, noise = noise, return_breakdown = True)
    errors = [(v - t).pow(2).flatten() for v, t in zip(pred.velocities, pred.targets)]
    pooled = torch.cat([errors[0], errors[2]]).mean()
    per_instance = (errors[0].mean() + errors[2].mean()) / 2
    assert not torch.isclose(pooled, per_instance, rtol = 1e-3), 'the batch does not tell the two apart'
    torch.testing.assert_close(parts.flow_per_modality[0], pooled)
    torch.testing.assert_close(parts.flow_per_modality[1], errors[1].mean())
    torch.testing.assert_close(parts.flow, (pooled + errors[1].mean()) / 2)
    torch.testing.assert_close(loss, 0.5 * parts.text + 2. * parts.flow)


def test_flow_loss_averages_over_the_modalities_present_only():
    """With loss weights (1, 3) and only modality 1 in the batch, the flow loss is modality 1's
    MSE itself (weights normalised over the modalities present), the same as with weights (1, 1)."""
    weighted, plain = tiny_model(modality_loss_weight = (1., 3.)).eval(), tiny_model().eval()
    plain.load_state_dict(weighted.state_dict())
    batch = [[randint(0, 16, (3,)), (1, randn(4, 4))], [(1, randn(2, 4)), randint(0, 16, (2,))]]
    times, noise = torch.tensor([.3, .6]), [randn(4, 4), randn(2, 4)]
    results = [model(batch, times = times, noise = noise, return_breakdown = True) for model in (weighted, plain)]
    for loss, parts in results:
        assert set(parts.flow_per_modality) == {1}
        torch.testing.assert_close(parts.flow, parts.flow_per_modality[1])
        torch.testing.assert_close(loss, parts.text + parts.flow)
    torch.testing.assert_close(results[0][0], results[1][0])


def test_drawn_training_noise_is_standard_normal_and_fresh_per_draw():
    model = tiny_model().train()
    packed = model.pack([[randint(0, 16, (2,)), randn(2, 3, 8), (1, randn(4, 4))]] * 40)
    _, first, _ = objective.draw(model, packed, None, None)
    _, second, _ = objective.draw(model, packed, None, None)
    assert [n.shape for n in first] == [g.data.shape for g in packed.groups]
    values = torch.cat([n.flatten() for n in first])                 # 40 * (48 + 16) elements
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1, (values.mean(), values.std())
    assert 0.45 < (values < 0).float().mean() < 0.55                # symmetric about 0
    assert not any(torch.equal(a, b) for a, b in zip(first, second))


def test_condition_dropout_drops_instances_at_the_configured_rate():
    """Each instance's condition is dropped with probability condition_dropout: over 400
    instances at 0.3 the dropped fraction lies within 3.5 standard deviations (0.08) of 0.3."""
    model = tiny_model(condition_dropout = 0.3).train()
    packed = model.pack([[(1, randn(2, 4))]] * 400)
    _, _, isolated = objective.draw(model, packed, None, None)
    dropped = isolated[torch.tensor(packed.instance_starts)]
    assert abs(dropped.float().mean() - 0.3) < 0.08, dropped.float().mean()


# the consistency loss

def record_predictions(module) -> list:
    """Record (times, noise) of every `predict_packed` call of `module`, then run it."""
    calls, original = [], module.predict_packed

    def recorded(packed, times = None, noise = None):
        calls.append((times.detach().clone(), [n.detach().clone() for n in noise]))
        return original(packed, times, noise)

    module.predict_packed = recorded
    return calls


def test_consistency_defaults_draw_times_below_one_minus_delta_and_gaussian_noise():
    """Default draws: student times uniform in [0, 1 - delta], the EMA at exactly times + delta
    (so never past t = 1, even for a large delta), both with the same standard normal noise."""
    delta = 0.9
    model = tiny_model()
    ema = make_ema(model)
    student, teacher = record_predictions(model), record_predictions(ema.module)
    loss = consistency_flow_loss(model, ema, randn(40, 8, 4), modality_type = 1, delta = delta)
    assert torch.isfinite(loss) and len(student) == len(teacher) == 1
    (times, noise), (ema_times, ema_noise) = student[0], teacher[0]
    assert times.shape == (40,) and ((times >= 0) & (times <= 1 - delta)).all()
    assert times.max() > 0.5 * (1 - delta) > times.min()
    torch.testing.assert_close(ema_times, times + delta)
    assert (ema_times <= 1).all()
    assert all(torch.equal(a, b) for a, b in zip(noise, ema_noise)) and len(noise) == 40
    values = torch.cat([n.flatten() for n in noise])                 # 40 * 32 elements
    assert abs(values.mean()) < 0.15 and abs(values.std() - 1) < 0.1, (values.mean(), values.std())
    assert 0.4 < (values < 0).float().mean() < 0.6


def test_consistency_averages_over_the_modalities_present_only():
    """Only modality 1 present: the loss does not depend on the modalities' loss weights, and with
    a constant-velocity head (zero weights, bias c) it is the closed form of that one modality,
    mean((delta d - delta c)^2) with d = x1 - noise (f_s - f_e = -delta d + delta c, alpha = 0)."""
    delta = 0.2
    weighted = tiny_model(modality_loss_weight = (1., 3.))
    constant_velocity(weighted)
    plain = tiny_model()
    plain.load_state_dict(weighted.state_dict())
    data, noise, times = [randn(4, 4), randn(2, 4)], [randn(4, 4), randn(2, 4)], torch.tensor([.1, .5])
    batch = [[randint(0, 16, (3,)), (1, data[0])], [(1, data[1])]]
    losses = [consistency_flow_loss(m, m, batch, delta = delta, alpha = 0., times = times, noise = noise) for m in (weighted, plain)]
    c = weighted.modalities.projections[1].proj_out.bias.detach()
    expected = torch.cat([(delta * (x1 - n) - delta * c).flatten() for x1, n in zip(data, noise)]).pow(2).mean()
    torch.testing.assert_close(losses[0], expected, rtol = 1e-4, atol = 1e-7)
    torch.testing.assert_close(losses[1], losses[0])


class ModeRecordingEncoder(nn.Conv2d):
    def __init__(self):
        super().__init__(3, 8, 1)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return super().forward(x)


def test_consistency_encodes_with_a_trainable_encoder_in_eval_mode_and_restores_it():
    """A trainable encoder (train mode during training) runs in eval mode for the consistency
    loss, as predict runs it, and is handed back in train mode."""
    encoder = ModeRecordingEncoder()
    model = tiny_model(dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = encoder, train_modality_encoders = True).train()
    loss = consistency_flow_loss(model, make_ema(model), randn(2, 3, 2, 2), delta = 0.1)
    assert torch.isfinite(loss)
    assert encoder.modes == [False] and encoder.training and model.training


# the ODE solver's tolerances

def test_adaptive_solver_applies_rtol_relative_and_atol_absolute():
    """On values near 1e6, rtol = 1e-10 with atol = 1e-2 asks for a relative error near 1e-10
    (rtol * |x| dominates): the solution is accurate to 1e-7. Swapped, the same numbers would
    allow a relative error of 1e-2."""
    x0 = 1e6 * (1 + torch.rand(4, dtype = torch.float64))
    exact = x0 * math.exp(math.sin(6))
    field = lambda t, x: 6 * torch.cos(6 * t) * x
    tight = flow.integrate(field, x0, 1, 'dopri5', rtol = 1e-10, atol = 1e-2)
    assert ((tight - exact).abs() / exact).max() < 1e-7
    loose = flow.integrate(field, x0, 1, 'dopri5', rtol = 1e-2, atol = 1e-10)
    assert ((loose - exact).abs() / exact).max() > 1e-6


# the token layout under condition dropout

def test_flex_pad_tokens_are_never_isolated_so_no_row_is_fully_masked():
    """With conditions dropped (isolated latents) on the flex backend, the tile padding stays a
    causal document of its own: pad rows are not isolated (an isolated pad, in no instance,
    would see nothing), and the padded mask is the rule with isolated pads False."""
    from torch.nn.attention.flex_attention import create_mask

    from transfusion_pytorch.masks import AttentionRule
    from transfusion_pytorch.token_layout import packed_transformer_inputs
    model = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'flex'))
    packed = model.pack([[randint(0, 16, (3,)), randn(2, 3, 8)], [(1, randn(4, 4)), randint(0, 16, (2,))]])
    isolated = packed.instance >= 0                                  # every instance's condition dropped
    _, mask, _, instance, pad = packed_transformer_inputs(model, packed, isolated, None)
    n = packed.length
    assert pad > 0
    allowed = create_mask(mask.block.mask_mod, None, None, n + pad, n + pad, device = 'cpu')[0, 0]
    rule = AttentionRule(mask.document, instance, torch.cat((isolated, isolated.new_zeros(pad))))
    assert torch.equal(allowed, rule.dense())
    assert torch.equal(allowed[n:, n:], torch.ones(pad, pad, dtype = torch.bool).tril()) and not allowed[n:, :n].any()
    assert allowed.any(-1).all()

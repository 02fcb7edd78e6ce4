"""Rules of the Transfusion module's glue (transfusion.py), of `eval_mode` (modes.py) and of the
debug-mode annotations (debug.py) that the rest of the suite left open: found by a mutation
review, each test fails with one of the mutations it names."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn, randint, randn

from transfusion_pytorch import Transfusion, debug
from transfusion_pytorch.modes import eval_mode

from conftest import tiny_model


# eval_mode

def three_level_module() -> nn.Sequential:
    """A root, a child and a grandchild, so a mode kept by a nested submodule is visible."""
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)))


@pytest.mark.parametrize('root_training, inner_training', [(True, False), (False, True), (True, True), (False, False)])
def test_eval_mode_turns_everything_off_and_restores_each_submodules_own_mode(root_training: bool, inner_training: bool):
    """Whatever mix of modes comes in (a model in eval with one block put back in train, a model
    in train with a frozen submodule in eval), every submodule is in eval inside the block, and
    afterwards each has its own previous mode back."""
    module = three_level_module().train(root_training)
    module[1][0].train(inner_training)
    before = [m.training for m in module.modules()]
    with eval_mode(module) as inside:
        assert inside is module
        assert not any(m.training for m in module.modules()), [m.training for m in module.modules()]
    assert [m.training for m in module.modules()] == before


def dropout_model() -> Transfusion:
    """tiny_model with heavy attention dropout: any forward that runs in train mode is random."""
    return tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, dropout = 0.5))


@pytest.mark.parametrize('train_root', [True, False])
def test_predict_runs_without_dropout_whatever_mix_of_modes_the_caller_left(train_root: bool):
    """predict equals the fully-eval prediction both for a training model holding one submodule
    in eval and for an eval model with one block put back in train."""
    model = dropout_model()
    batch, times, noise = [[randint(0, 16, (3,)), randn(2, 3, 8)]], torch.tensor([.4]), [randn(2, 3, 8)]
    expected = model.eval().predict(batch, times, noise)
    model.train(train_root)
    (model.modalities if train_root else model.transformer.blocks[0]).train(not train_root)
    got = model.predict(batch, times, noise)
    torch.testing.assert_close(got.velocities[0], expected.velocities[0], rtol = 0, atol = 0)
    torch.testing.assert_close(got.logits[0], expected.logits[0], rtol = 0, atol = 0)


# construction

def test_one_encoder_per_modality_or_one_for_all():
    """A tuple of coders must name one per modality (a longer one is refused, not cut); a single
    module serves every modality."""
    with pytest.raises(ValueError, match = r'expected one encoder/decoder per modality \(2\), got 3'):
        tiny_model(modality_encoder = (nn.Identity(), nn.Identity(), nn.Identity()))
    model = tiny_model(dim_latent = (8, 8), modality_encoder = nn.Linear(3, 8))
    packed = model.pack([[(0, randn(2, 3, 3)), (1, randn(4, 3))]])   # raw 3-d data encoded to 8-d for both
    assert packed.instance_modality == [0, 1] and [g.data.shape[-1] for g in packed.groups] == [8, 8]


# forward: what applies to which kind of batch

@pytest.mark.parametrize('keywords', [dict(noise = [randn(2, 8)]), dict(modality_type = 0), dict(times = torch.rand(1))])
def test_integer_tensor_batches_refuse_every_modality_keyword(keywords: dict):
    """A text-only batch has no instances: times, noise and modality_type are refused, not ignored."""
    with pytest.raises(ValueError, match = 'an integer tensor batch is text-only language modelling'):
        tiny_model()(randint(0, 16, (2, 5)), **keywords)


@pytest.mark.parametrize('shape', [(0, 2, 3, 8), ()])
def test_modality_only_batches_need_a_batch_axis_with_rows(shape: tuple):
    """No rows is named as such, not reported as an empty list of samples."""
    expected = f'modality-only training expects a floating tensor (b, ...) with b >= 1, got shape {shape}'
    for call in (lambda model: model(randn(shape)), lambda model: model.predict(randn(shape))):
        with pytest.raises(ValueError, match = re.escape(expected)):
            call(tiny_model())


def test_modality_type_is_refused_for_a_list_of_samples():
    """Each item of a list names its own modality: a modality_type there is a mistake to report,
    not to ignore."""
    batch = [[(1, randn(3, 4))]]
    for call in (lambda model: model(batch, modality_type = 1), lambda model: model.predict(batch, modality_type = 1)):
        with pytest.raises(ValueError, match = 'modality_type applies to a floating tensor batch'):
            call(tiny_model())


class CountingEncoder(nn.Module):
    """A trainable 1x1 conv encoder that counts the inputs it saw in train mode in a buffer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.register_buffer('seen', torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += x.shape[0]
        return self.proj(x)


def test_pack_refusing_a_batch_hands_back_the_encoders_buffers():
    """`pack` (used directly by consistency training) runs a trainable encoder before it sees a
    bad text id; the refusal must leave the encoder's buffers as they were, as forward does."""
    model = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = CountingEncoder(), train_modality_encoders = True, transformer = dict(dim = 32, depth = 1))
    model.pack([[randn(3, 2, 2)]])
    assert model.modalities.encoders[0].seen == 1     # it does count in train mode
    with pytest.raises(ValueError, match = r'sample 0, item 1: text id 9 is outside'):
        model.pack([[randn(3, 2, 2), torch.tensor([9])]])
    assert model.modalities.encoders[0].seen == 1


# predict

def test_predicted_token_ids_are_minus_one_exactly_at_latent_positions():
    """Every latent token, those of the first instance included, reads -1; nothing else does;
    each sample gets one logits row per token of its own."""
    model = tiny_model()
    batch = [[randn(2, 3, 8), randint(0, 16, (3,))], [randint(0, 16, (2,)), (1, randn(4, 4))]]
    prediction = model.predict(batch)
    packed = model.pack(batch)
    for (a, b), ids, logits in zip(packed.sample_slices, prediction.token_ids, prediction.logits):
        torch.testing.assert_close(ids == -1, packed.instance[a:b] >= 0)
        assert logits.shape == (b - a, model.vocab.size)   # one row per own token, none of the next sample's
    assert [int((ids == -1).sum()) for ids in prediction.token_ids] == [6, 4]


def test_each_modality_comes_back_in_its_own_latent_layout():
    """channel_first_latent per modality: predictions of the channel-first modality are
    (dim_latent, *axes), those of the other (*axes, dim_latent), also when modality 0 is the
    channel-last one; values are the noised inputs and targets in that same layout."""
    model = tiny_model(channel_first_latent = (False, True))
    data, noise, times = [randn(2, 3, 8), randn(4, 5)], [randn(2, 3, 8), randn(4, 5)], torch.tensor([.25, .75])
    prediction = model.predict([[data[0], (1, data[1])]], times, noise)
    assert [tuple(v.shape) for v in prediction.velocities] == [(2, 3, 8), (4, 5)]
    for i in range(2):
        torch.testing.assert_close(prediction.noised[i], (1 - times[i]) * noise[i] + times[i] * data[i])
        torch.testing.assert_close(prediction.targets[i], data[i] - noise[i])


def randomise_time_modulation(model: Transfusion) -> Transfusion:
    """adaLN parameters start at zero (identity); random ones make the time modulation visible."""
    with torch.no_grad():
        for parameter in model.modalities.adaptive.parameters():
            parameter.normal_(std = 0.5)
    return model


def test_adaptive_time_conditioning_modulates_each_instance_with_its_own_time():
    """Batched predict equals predict sample by sample with time_conditioning='adaptive': every
    instance is modulated with its own time, not another instance's."""
    model = randomise_time_modulation(tiny_model(time_conditioning = 'adaptive')).eval()
    batch = [[randint(0, 16, (3,)), randn(2, 3, 8)], [(1, randn(3, 4)), randint(0, 16, (2,))], [randn(1, 2, 8)]]
    times, noise = torch.tensor([.1, .5, .9]), [randn(2, 3, 8), randn(3, 4), randn(1, 2, 8)]
    together = model.predict(batch, times, noise)
    for s, sample in enumerate(batch):
        alone = model.predict([sample], times[s:s + 1], noise[s:s + 1])
        torch.testing.assert_close(together.velocities[s], alone.velocities[0], rtol = 1e-4, atol = 1e-5)
        torch.testing.assert_close(together.logits[s], alone.logits[0], rtol = 1e-4, atol = 1e-5)


def test_activation_checkpointing_keeps_the_adaptive_time_modulation():
    """The checkpointed blocks get the same adaLN modulation as the plain ones: with nonzero
    adaptive parameters (a fresh model's zeros would hide a dropped modulation), the training
    loss and every gradient agree with and without checkpoint_activations."""
    small = dict(dim = 32, depth = 2, heads = 2, dim_head = 16)
    plain = randomise_time_modulation(tiny_model(time_conditioning = 'adaptive', transformer = small)).train()
    checkpointed = tiny_model(time_conditioning = 'adaptive', transformer = dict(small, checkpoint_activations = True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch = [[randint(0, 16, (3,)), randn(2, 3, 8), randint(0, 16, (2,))], [(1, randn(3, 4)), randint(0, 16, (2,))]]
    times, noise = torch.tensor([.3, .7]), [randn(2, 3, 8), randn(3, 4)]
    losses = [model(batch, times = times, noise = noise) for model in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol = 1e-6, rtol = 1e-5, msg = lambda m: f'{name}: {m}')


# debug-mode annotations, checked in-process: `debug.checked` wraps the undecorated methods

def test_debug_annotations_accept_what_predict_documents():
    """predict's times may be a tensor of one time per instance, a 0-d tensor or a list of floats,
    as for forward; debug mode must not refuse a documented form."""
    model = tiny_model()
    predict = debug.checked(Transfusion.predict.__wrapped__)
    batch, noise = [[randint(0, 16, (2,)), randn(2, 3, 8)], [(1, randn(3, 4))]], [randn(2, 3, 8), randn(3, 4)]
    expected = model.predict(batch, torch.tensor([.2, .6]), noise).velocities
    for times in ([.2, .6], (.2, .6), torch.tensor([.2, .6])):
        for got, want in zip(predict(model, batch, times, noise).velocities, expected):
            torch.testing.assert_close(got, want)
    single = [[randn(1, 2, 8)]]
    torch.testing.assert_close(predict(model, single, torch.tensor(.3), [randn(1, 2, 8)]).times, torch.tensor([.3]))


@pytest.mark.parametrize('prompt', [torch.tensor([1, 2]), torch.tensor([[1., 2.]])])
def test_debug_mode_keeps_the_library_message_for_a_bad_text_prompt(prompt: torch.Tensor):
    """generate_text_only explains a prompt of the wrong rank or dtype itself; its annotation is
    broad so debug mode does not replace that message with a generic type error."""
    generate = debug.checked(getattr(Transfusion.generate_text_only, '__wrapped__', Transfusion.generate_text_only))
    with pytest.raises(ValueError, match = r'prompt must be integer token ids of shape \(b, p\) with p >= 1'):
        generate(tiny_model(), prompt, 4)


# sampling defaults

def same_samples(a: list, b: list) -> bool:
    """Whether two samples hold the same items: equal text, and equal modality index and latents."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) != isinstance(y, tuple):
            return False
        if isinstance(x, tuple):
            if x[0] != y[0] or x[1].shape != y[1].shape or not torch.allclose(x[1], y[1], atol = 1e-6):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def test_sampling_defaults_are_the_values_the_readme_shows():
    """sample() without keywords equals sample() with the README's values (text_min_p 0.1,
    modality_steps 16, midpoint, cfg_scale 1); each value changed gives another sample, so
    the comparison can tell. Peaked logits make the min-p cut matter."""
    model = tiny_model()
    with torch.no_grad():
        model.to_logits.weight.mul_(4)
    common = dict(max_length = 24, force_modality_at_start = 1, seed = 3, show_progress = False)
    readme = dict(text_temperature = 1., text_min_p = 0.1, modality_steps = 16, ode_method = 'midpoint', cfg_scale = 1.)
    default = model.sample(**common)
    assert same_samples(default, model.sample(**common, **readme))
    for changed in (dict(text_min_p = 0.), dict(modality_steps = 8), dict(ode_method = 'euler'), dict(cfg_scale = 1.5)):
        assert not same_samples(default, model.sample(**common, **{**readme, **changed})), changed


# generate_modality_only

@pytest.mark.parametrize('modality_type', [2, -1])
def test_generate_modality_only_names_a_modality_index_out_of_range(modality_type: int):
    """The last index + 1 and negative indices are refused with the model's count, never an IndexError."""
    with pytest.raises(ValueError, match = rf'modality_type {modality_type} is not a modality of this model \(2 modalities\)'):
        tiny_model().generate_modality_only(modality_type = modality_type, modality_steps = 1)


def test_generate_modality_only_is_sample_forced_to_that_modality_with_the_same_options():
    """generate_modality_only(...) equals sample() forced to start with that modality and shape,
    with the same ODE method, steps, guidance and seed; guidance and the method do change it."""
    model = tiny_model()
    options = dict(modality_steps = 2, ode_method = 'heun2', cfg_scale = 3., seed = 5)
    generated = model.generate_modality_only(2, modality_type = 1, fixed_modality_shape = (4,), **options)
    for row in range(2):
        sampled = model.sample(force_modality_at_start = (1, (4,)), stop_after_modality = True, show_progress = False,
                               **{**options, 'seed': 5 + row})
        torch.testing.assert_close(generated[row], sampled[-1][1])
    for changed in (dict(cfg_scale = 1.), dict(ode_method = 'midpoint')):
        other = model.generate_modality_only(2, modality_type = 1, fixed_modality_shape = (4,), **{**options, **changed})
        assert not torch.allclose(other, generated), changed


def test_text_generation_in_train_mode_runs_without_dropout():
    """Greedy text generation from a model left in train mode equals generation in eval mode,
    and the model is handed back in train mode."""
    model = dropout_model()
    prompt = randint(0, 16, (2, 3))
    expected = model.eval().generate_text_only(prompt, 12, temperature = 0., compile_step = False)
    model.train()
    for cache_kv in (True, False):
        got = model.generate_text_only(prompt, 12, temperature = 0., cache_kv = cache_kv, compile_step = False)
        assert torch.equal(got, expected), cache_kv
    assert model.training


@pytest.mark.parametrize('alibi_heads, expected', [(0, [0., 0.]), (1, [2. ** -8, 0.]), (2, [2. ** -4, 2. ** -8])])
def test_only_the_configured_heads_get_alibi_slopes(alibi_heads: int, expected: list):
    """alibi_heads of the 2 heads get the geometric slopes 2^(-8 i / alibi_heads); the rest none."""
    model = tiny_model(alibi_heads = alibi_heads)
    torch.testing.assert_close(model.alibi.slopes, torch.tensor(expected), rtol = 0, atol = 0)


# a model in another dtype

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_predict_of_a_unet_model_in_another_dtype_matches_its_loss(dtype: torch.dtype):
    """A U-Net modality re-reads the network input x_t for its skip path: predict must hand it
    over in the model's dtype, as the loss does (fp32 data into a bf16 model raised a dtype
    mismatch in predict only). The flow loss equals the MSE of predict's velocities."""
    model = tiny_model(modality_downsample = (2, 1), modality_default_shape = ((2, 4), (3,))).to(dtype).eval()
    batch, times, noise = [[randint(0, 16, (3,)), randn(2, 4, 8)]], torch.tensor([.3]), [randn(2, 4, 8)]
    prediction = model.predict(batch, times, noise)
    _, parts = model(batch, times = times, noise = noise, return_breakdown = True)
    mse = torch.nn.functional.mse_loss(prediction.velocities[0].float(), prediction.targets[0].float())
    torch.testing.assert_close(parts.flow_per_modality[0].float(), mse)


def test_a_model_built_on_the_meta_device_initialises_like_a_fresh_one():
    """with torch.device('meta'), to_empty, reset_parameters: zero norm gains and adaLN, identity
    skip merges, and random weights from the same distributions as at construction; the user's
    encoder keeps its weights."""
    options = dict(num_text_tokens = 16, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                   time_conditioning = 'adaptive', transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, qk_norm = True, unet_skips = True))
    def build(seed: int) -> Transfusion:
        torch.manual_seed(seed)
        return Transfusion(**options)
    fresh, other_seed = build(0), build(1)
    encoder = torch.nn.Conv2d(3, 8, 1)
    with torch.device('meta'):
        model = Transfusion(**options, modality_encoder = encoder)
    model.to_empty(device = 'cpu')
    kept = model.modalities.encoders[0].weight.detach().clone()
    model.reset_parameters()
    assert torch.equal(model.modalities.encoders[0].weight, kept)
    others = dict(other_seed.named_parameters())
    for name, parameter in fresh.named_parameters():
        reset = model.get_parameter(name)
        if torch.equal(parameter, others[name]):     # a deterministic init
            assert torch.equal(reset, parameter), name
        else:
            assert 0.8 < reset.std() / parameter.std() < 1.25 and reset.abs().max() <= 1.5 * parameter.abs().max(), name


def peaked_text_model():
    model = tiny_model()
    with torch.no_grad():
        model.to_logits.weight.mul_(4)
    return model


def test_generate_text_only_defaults_are_temperature_1_and_min_p_0_1():
    model = peaked_text_model()
    prompt = randint(0, 16, (2, 3))

    def run(**kw):
        torch.manual_seed(7)
        return model.generate_text_only(prompt, 24, **kw)
    default = run()
    assert torch.equal(default, run(temperature = 1., min_p = 0.1))
    assert not torch.equal(default, run(temperature = 1., min_p = 0.))


def test_generate_text_only_compiles_its_step_by_default_as_compile_blocks_says(monkeypatch):
    from transfusion_pytorch import text_generation
    seen = []
    monkeypatch.setattr(text_generation, 'generate_text_only', lambda model, *args: seen.append(args[-1]))
    prompt = randint(0, 16, (1, 2))
    for compile_blocks in (True, False):
        model = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, compile_blocks = compile_blocks))
        model.generate_text_only(prompt, 4)
    tiny_model().generate_text_only(prompt, 4, compile_step = True)
    assert seen == [True, False, True]


def test_generate_modality_only_defaults_to_16_midpoint_steps():
    model = tiny_model()
    run = lambda **kw: model.generate_modality_only(1, 1, seed = 3, **kw)
    default = run()
    torch.testing.assert_close(default, run(modality_steps = 16, ode_method = 'midpoint'), rtol = 0, atol = 0)
    assert not torch.allclose(default, run(modality_steps = 8), atol = 1e-6)


def test_predict_encodes_with_a_trainable_encoder_in_eval_mode():
    """predict runs without dropout, its encoder included: a trainable encoder (in train mode
    while the model trains) must see eval mode, and get it back afterwards."""
    modes = []

    class Recording(nn.Conv2d):
        def forward(self, x):
            modes.append(self.training)
            return super().forward(x)

    model = tiny_model(dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = Recording(3, 8, 1), train_modality_encoders = True).train()
    model.predict(randn(2, 3, 2, 2))
    assert modes == [False]
    assert model.modalities.encoders[0].training

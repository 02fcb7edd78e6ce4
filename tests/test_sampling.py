"""Multimodal sampling: cached == uncached, batched == one by one, guidance, dtypes, and an
end-to-end toy task."""
import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import Transfusion, decoding, print_modality_sample

from conftest import tiny_model


QUIET = dict(show_progress = False)


def is_modality(item):
    return isinstance(item, tuple)


def assert_samples_equal(a, b, atol = 1e-5):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert is_modality(x) == is_modality(y)
        if is_modality(x):
            assert x[0] == y[0] and x[1].shape == y[1].shape
            torch.testing.assert_close(x[1], y[1], atol = atol, rtol = atol)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize('options', [dict(), dict(time_conditioning = 'adaptive'), dict(causal_modality_attention = True)])
def test_cached_equals_uncached_through_a_forced_modality(options):
    model = tiny_model(**options)
    if model.modalities.adaptive is not None:   # zero-initialised: give the modulation an effect to get wrong
        for parameter in model.modalities.adaptive.parameters():
            torch.nn.init.normal_(parameter, std = 0.1)
    kwargs = dict(max_length = 64, text_temperature = 0., force_modality_at_start = 0, modality_steps = 4, seed = 3, **QUIET)
    cached = model.sample(cache_kv = True, **kwargs)
    uncached = model.sample(cache_kv = False, **kwargs)
    assert is_modality(cached[0]) and len(cached) >= 2, cached   # text follows the modality
    assert_samples_equal(cached, uncached)


def test_cached_equals_uncached_with_prompt_and_guidance():
    model = tiny_model()
    prompt = [randint(0, 16, (3,)), (1, randn(2, 4)), randint(0, 16, (2,))]
    kwargs = dict(max_length = 50, text_temperature = 0., force_modality_at_start = (0, (2, 2)), modality_steps = 3, cfg_scale = 3., seed = 0, **QUIET)
    assert_samples_equal(model.sample(prompt, cache_kv = True, **kwargs), model.sample(prompt, cache_kv = False, **kwargs))


def test_sample_many_equals_sample_one_by_one():
    model = tiny_model()
    prompts = [None, randint(0, 16, (3,)), (1, randn(3, 4)), [randint(0, 16, (2,)), randn(1, 2, 8)]]
    kwargs = dict(max_length = 40, modality_steps = 3, text_temperature = 1., **QUIET)
    many = model.sample_many(prompts, seed = [5, 6, 7, 8], **kwargs)
    for prompt, seed, batched in zip(prompts, [5, 6, 7, 8], many):
        assert_samples_equal(batched, model.sample(prompt, seed = seed, **kwargs))


def test_an_adaptive_solver_samples_batched_as_one_by_one():
    """dopri5 picks its steps from one error norm over its state: rows solved together would
    change each other's steps (differences of about 1e-2 on this model), so each solves alone."""
    model = tiny_model()
    prompts = [None, randint(0, 16, (3,)), randint(0, 16, (1,))]
    kwargs = dict(max_length = 40, force_modality_at_start = (0, (2, 3)), ode_method = 'dopri5', stop_after_modality = True, **QUIET)
    many = model.sample_many(prompts, seed = [1, 2, 3], **kwargs)
    for prompt, seed, batched in zip(prompts, [1, 2, 3], many):
        assert_samples_equal(batched, model.sample(prompt, seed = seed, **kwargs))


@pytest.mark.parametrize('options', [dict(), dict(force_modality_at_start = 0, cfg_scale = 2.)])
def test_long_samples_agree_batched_one_by_one_and_uncached(monkeypatch, options):
    """Cached steps attend over the slots their rows have filled (rounded up to 64), not the
    whole cache, and rows that finish are dropped from the cache: neither changes a sample.
    Prompts of 70 to 190 tokens put the rows in different windows, and the rows end at
    different steps, so later steps run on a compacted cache; with a forced modality and
    guidance, the ODE's steps (and their unconditional rows) run in those windows too."""
    compactions = []
    compact = decoding.CachedRunner._compact
    monkeypatch.setattr(decoding.CachedRunner, '_compact', lambda runner: (compactions.append(runner.cache.batch), compact(runner)))
    model = tiny_model()
    prompts = [randint(0, 16, (n,)) for n in (70, 190, 130, 100)]
    seeds = [1, 2, 3, 4]
    kwargs = dict(max_length = 240, modality_steps = 2, text_temperature = 1., **options, **QUIET)
    many = model.sample_many(prompts, seed = seeds, **kwargs)
    assert len(compactions) >= 2, compactions                     # rows finished at different steps
    assert all(len(sample) > 1 and is_modality(sample[1]) for sample in many) == ('force_modality_at_start' in options)
    for prompt, seed, batched in zip(prompts, seeds, many):
        assert_samples_equal(batched, model.sample(prompt, seed = seed, **kwargs))
        assert_samples_equal(batched, model.sample(prompt, seed = seed, cache_kv = False, **kwargs))


def test_a_sample_is_valid_input_to_forward_and_prompt():
    model = tiny_model()
    samples = model.sample_many([None, randint(0, 16, (2,))], force_modality_at_start = 1, max_length = 40, modality_steps = 2, seed = 0, **QUIET)
    assert torch.isfinite(model(samples))
    continued = model.sample(samples[0], max_length = 60, modality_steps = 2, seed = 1, **QUIET)
    assert_samples_equal(continued[:len(samples[0])], samples[0])


def test_cfg_scale_one_equals_unguided():
    model = tiny_model()
    kwargs = dict(max_length = 40, force_modality_at_start = 0, modality_steps = 3, seed = 2, **QUIET)
    assert_samples_equal(model.sample(cfg_scale = 1., **kwargs), model.sample(**kwargs))
    guided = model.sample(cfg_scale = 4., **kwargs)
    assert not torch.allclose(guided[0][1], model.sample(**kwargs)[0][1])


def test_generate_modality_only_and_decoder_layout():
    decoder = torch.nn.Conv2d(8, 3, 1)
    model = tiny_model(dim_latent = 8, modality_default_shape = (2, 3), channel_first_latent = True, modality_decoder = decoder)
    out = model.generate_modality_only(batch_size = 3, modality_steps = 2)
    assert out.shape == (3, 3, 2, 3)
    out = model.generate_modality_only(batch_size = 2, fixed_modality_shape = (4, 4), modality_steps = 2)
    assert out.shape == (2, 3, 4, 4)


def test_print_modality_sample(capsys):
    print_modality_sample([torch.tensor([1, 2, 3]), (0, torch.randn(2, 3, 8))])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('[text: 3 tokens] 1 2 3') and lines[1].startswith('[modality 0: (2, 3, 8)')


def test_end_to_end_toy_task():
    """Text token k is followed by a 1-token latent filled with k / 4: after training, prompting
    with k generates a latent close to k / 4 (the whole loop: forward, shapes, ODE, cache)."""
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 4, dim_latent = 4, modality_default_shape = (2,), add_modality_shape_tokens = False,
                        transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    for step in range(400):
        ks = torch.randint(0, 4, (16,))
        batch = [[k.reshape(1), torch.full((2, 4), k.item() / 4.)] for k in ks]
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for k in range(4):
        sample = model.sample(torch.tensor([k]), max_length = 7, force_modality_at_start = 0, modality_steps = 8, seed = k, **QUIET)
        latent = sample[1][1]
        assert (latent - k / 4).abs().mean() < 0.1, (k, latent)


def test_stop_after_modality_gives_one_instance_per_prompt():
    model = tiny_model()
    samples = model.sample_many([randint(0, 16, (2,)), None], force_modality_at_start = (1, (3,)), max_length = 60,
                                modality_steps = 2, seed = 0, stop_after_modality = True, **QUIET)
    assert [len(s) for s in samples] == [2, 1]
    assert is_modality(samples[0][-1]) and is_modality(samples[1][-1])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_a_model_in_another_dtype_samples_through_its_decoder(dtype):
    """The ODE runs in at least fp32; what it returns (and what the decoder gets) is in the
    model's dtype."""
    decoded = tiny_model(dim_latent = 8, modality_default_shape = (2, 3), channel_first_latent = True,
                         modality_decoder = torch.nn.Conv2d(8, 3, 1)).to(dtype)
    images = decoded.generate_modality_only(batch_size = 2, modality_steps = 2)
    assert images.dtype == dtype and images.shape == (2, 3, 2, 3)
    plain = tiny_model().to(dtype)
    sample = plain.sample(force_modality_at_start = 0, modality_steps = 2, stop_after_modality = True, **QUIET)
    assert sample[0][1].dtype == dtype


def test_cfg_scale_zero_is_the_unconditional_field():
    """At cfg_scale 0 the field is the unconditional branch alone, which sees only its own
    instance: two different prompts give the same latents from the same noise."""
    model = tiny_model()
    kw = dict(max_length = 40, force_modality_at_start = (0, (2, 3)), modality_steps = 3, seed = 2, show_progress = False,
              stop_after_modality = True, cfg_scale = 0.)
    a = model.sample(randint(0, 16, (5,)), **kw)[-1][1]
    b = model.sample([randint(0, 16, (2,)), (1, randn(3, 4))], **kw)[-1][1]
    torch.testing.assert_close(a, b)


def test_returned_latents_are_what_the_model_conditioned_on():
    """Greedy text after a sampled instance equals greedy text after the same instance given back as a prompt."""
    model = tiny_model()
    kw = dict(text_temperature = 0., max_length = 30, modality_steps = 2, show_progress = False)
    first = model.sample(force_modality_at_start = (0, (2, 3)), seed = 0, **kw)
    again = model.sample([first[0]], seed = 1, **kw)
    assert len(first) > 1 and torch.equal(first[1], again[1])


def test_the_ode_runs_in_fp32_for_a_bf16_model(monkeypatch):
    from transfusion_pytorch import flow
    dtypes, integrate = [], flow.integrate
    monkeypatch.setattr(flow, 'integrate', lambda field, noise, *a, **k: (dtypes.append(noise.dtype), integrate(field, noise, *a, **k))[1])
    tiny_model().to(torch.bfloat16).generate_modality_only(modality_steps = 2)
    assert dtypes == [torch.float32]

"""Multimodal sampling: cached == uncached, batched == one by one, shapes, guidance, and an
end-to-end toy task."""
import math

import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import Transfusion, decoding, print_modality_sample, sampling
from transfusion_pytorch.tokens import ShapeDecoder, Vocabulary

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


def test_multi_axis_shape_round_trips_through_shape_tokens():
    vocab = Vocabulary(16, 1)
    ids = vocab.shape_ids((3, 15))
    decoder = ShapeDecoder(vocab, num_axes = 2, max_value = 9999)
    for token in ids:
        assert token in decoder.allowed(budget = 100)
        decoder.push(token)
    assert decoder.done and decoder.shape == (3, 15)


def test_forced_multi_axis_shape_round_trips_through_the_model():
    model = tiny_model()
    sample = model.sample(force_modality_at_start = (0, (3, 5)), max_length = 40, modality_steps = 2, **QUIET)
    assert sample[0][0] == 0 and sample[0][1].shape == (3, 5, 8)


def test_constraint_makes_an_untrained_model_produce_parseable_shapes():
    model = tiny_model()
    with _no_fallback_warning():
        samples = model.sample_many([None] * 6, force_modality_at_start = 0, max_length = 48, modality_steps = 1,
                                    text_temperature = 2., text_min_p = 0., seed = 0, **QUIET)
    for sample in samples:
        modality, data = sample[0]
        assert modality == 0 and data.ndim == 3 and data.shape[-1] == 8
        # the whole instance fit within max_length: BOS + begin + shape tokens + latents + end
        shape_tokens = len(model.vocab.shape_ids(tuple(data.shape[:2])))
        assert 1 + 1 + shape_tokens + math.prod(data.shape[:2]) + 1 <= 48


class _no_fallback_warning:
    def __enter__(self):
        import warnings
        self.catcher = warnings.catch_warnings(record = True)
        self.records = self.catcher.__enter__()
        warnings.simplefilter('always')
    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        assert not [r for r in self.records if 'default shape' in str(r.message)]


def test_max_length_is_never_exceeded():
    model = tiny_model()
    for seed in range(4):
        sample = model.sample(max_length = 30, seed = seed, text_temperature = 1.5, text_min_p = 0., modality_steps = 1, **QUIET)
        packed = model.pack([sample])
        assert packed.length <= 30 + 1  # + EOS, which the sample does not hold


@pytest.mark.parametrize('preferred', ['begin', 'eos'])
def test_max_length_holds_whatever_the_sampler_prefers(monkeypatch, preferred):
    """A sampler that always takes a begin token when the grammar allows one (or EOS) never
    starts a modality without room to finish it, never passes max_length and never ends a
    sample empty, at every max_length from the smallest up, free shapes and fixed ones."""
    model = tiny_model()
    vocab = model.vocab
    favourites = list(vocab.begin) if preferred == 'begin' else [vocab.eos]

    def choose(logits, temperature, min_p, allowed, generators):
        score = torch.zeros(allowed.shape)
        score[:, favourites] = 1
        return score.masked_fill(~allowed, -1).argmax(dim = -1)   # else the lowest allowed id

    monkeypatch.setattr(sampling, 'choose_tokens', choose)
    for fixed in (None, {0: (1, 2), 1: (2,)}):
        for max_length in range(3, 24):
            sample = model.sample(max_length = max_length, fixed_modality_shape = fixed, modality_steps = 1, **QUIET)
            assert sample, max_length
            assert model.pack([sample]).length <= max_length + 1, (max_length, sample)   # + EOS, which the sample does not hold
            if preferred == 'begin' and max_length >= 12:
                assert any(is_modality(item) for item in sample), (max_length, sample)


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


def test_sampling_validates_its_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match = 'force_modality_at_start names modality 5'):
        model.sample(force_modality_at_start = 5, **QUIET)
    with pytest.raises(ValueError, match = r'fixed_modality_shape: modality 0 has 2 axes, got shape \(2,\)'):
        model.sample(fixed_modality_shape = {0: (2,)}, **QUIET)
    with pytest.raises(ValueError, match = 'sample 0, item 0: text id 99'):
        model.sample(torch.tensor([99]), **QUIET)
    with pytest.raises(ValueError, match = 'leaves no room'):
        model.sample(randint(0, 16, (20,)), max_length = 10, **QUIET)


@pytest.mark.parametrize('call, error, message', [
    (lambda m: m.sample_many(torch.tensor([1, 2]), **QUIET), TypeError, "prompts must be a list of prompts .* got Tensor|parameter 'prompts'"),
    (lambda m: m.sample_many(None, **QUIET), TypeError, "prompts must be a list of prompts .* got NoneType|parameter 'prompts'"),
    (lambda m: m.sample(cache_kv = 'no', **QUIET), TypeError, "cache_kv must be a bool, got str|parameter 'cache_kv'"),
    (lambda m: m.sample_many([None], stop_after_modality = 'no', **QUIET), TypeError, "stop_after_modality must be a bool, got str|parameter 'stop_after_modality'"),
    (lambda m: m.generate_text_only([[1, 2]], 5), TypeError, "prompt must be a tensor of token ids|parameter 'prompt'"),
    (lambda m: m.generate_text_only(randint(0, 16, (1, 2)), -5), ValueError, r'seq_len \(the length with the prompt\) must be at least 1, got -5'),
    (lambda m: m.generate_text_only(randint(0, 16, (1, 2)), 5, compile_step = 1), TypeError, "compile_step must be a bool, got int|parameter 'compile_step'"),
])
def test_sampling_refuses_arguments_of_the_wrong_kind(call, error, message):
    """A tensor of prompts would read as one prompt per token, a flag 'no' as true, a negative
    length as an empty request: each is refused, naming the argument."""
    with pytest.raises(error, match = message):
        call(tiny_model())


def test_numpy_integers_name_forced_modalities_and_shapes_and_numpy_bools_are_flags():
    """NumPy ints pass wherever Python ints do, fixed_modality_shape's keys included."""
    np = pytest.importorskip('numpy')
    model = tiny_model()
    assert model.sample_many([None], max_length = 8, cache_kv = np.False_, stop_after_modality = np.True_, **QUIET)
    assert model.generate_text_only(randint(0, 16, (1, 2)), 4, cache_kv = np.True_).shape == (1, 2)
    sample = model.sample(force_modality_at_start = (np.int64(1), (np.int64(3),)), modality_steps = 1, stop_after_modality = True, **QUIET)
    assert sample[0][0] == 1 and sample[0][1].shape == (3, 4)
    assert model.generate_modality_only(modality_type = 1, fixed_modality_shape = (np.int32(2),), modality_steps = 1).shape == (1, 2, 4)
    sample = model.sample(force_modality_at_start = np.int64(1), fixed_modality_shape = {np.int64(1): (2,)}, modality_steps = 1,
                          stop_after_modality = True, **QUIET)
    assert sample[0][0] == 1 and sample[0][1].shape == (2, 4)


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


def test_sampled_shapes_are_valid_input_when_downsampled():
    """The shape grammar bounds the transformer-side grid, whose data shape is the grid times
    the downsample factor: every sampled instance must still fit max_shape_value."""
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (4,), modality_downsample = 2,
                        max_shape_value = 9, transformer = dict(dim = 32, depth = 1))
    samples = model.sample_many([None] * 24, force_modality_at_start = 0, max_length = 30, text_temperature = 2., text_min_p = 0.,
                                modality_steps = 1, seed = 0, stop_after_modality = True, **QUIET)
    shapes = {tuple(sample[0][1].shape[:-1]) for sample in samples}
    assert len(shapes) > 2 and all(shape[0] <= 9 for shape in shapes), shapes
    model(samples)   # valid input as it is
    with pytest.raises(ValueError, match = r'force_modality_at_start: shape \(12,\) for modality 0 exceeds max_shape_value=9'):
        model.sample(force_modality_at_start = (0, (12,)), **QUIET)


def test_prompt_errors_name_the_prompt_by_its_index():
    model = tiny_model()
    with pytest.raises(ValueError, match = r'sample 2, item 0: text id 99'):
        model.sample_many([None, torch.tensor([1, 2]), torch.tensor([3, 99])], max_length = 20, **QUIET)
    with pytest.raises(ValueError, match = r'sample 1, item 1: modality 0 expects latents'):
        model.sample_many([None, [torch.tensor([1]), randn(2, 3, 5)]], max_length = 20, **QUIET)


@pytest.mark.parametrize('keywords, error, message', [
    (dict(text_temperature = -1.), ValueError, r'text_temperature must be finite and >= 0'),
    (dict(text_temperature = float('inf')), ValueError, r'text_temperature must be finite and >= 0 \(0 is greedy\), got inf'),
    (dict(text_min_p = 1.5), ValueError, r'text_min_p must lie in \[0, 1\], got 1.5'),
    (dict(max_length = 20.), TypeError, r"max_length must be an int, got float|parameter 'max_length'"),   # the latter: debug mode
    (dict(text_temperature = '1'), TypeError, r"text_temperature must be a number, got str|parameter 'text_temperature'"),
    (dict(cfg_scale = float('nan'), force_modality_at_start = 0), ValueError, r'cfg_scale must be finite \(1: no guidance\), got nan'),
    (dict(cfg_scale = '2'), TypeError, r"cfg_scale must be a number \(1: no guidance\), got str|parameter 'cfg_scale'"),
    (dict(ode_method = 'rk45', max_length = 5), ValueError, r"ode_method must be one of torchdiffeq's methods .* got 'rk45'"),   # refused before any text step
    (dict(seed = 1.5), TypeError, r'seed must be an int, or a list of ints \(one per prompt\), got float'),
    (dict(seed = [2 ** 70]), ValueError, r'the seed of prompt 0 must be an int in \[-2\*\*63, 2\*\*64\), got 1180591620717411303424'),
    (dict(force_modality_at_start = (0,)), TypeError, r'force_modality_at_start must be a modality index or \(index, shape\)'),
    (dict(force_modality_at_start = [0, (2, 3)]), TypeError, r'force_modality_at_start must be a modality index'),
    (dict(force_modality_at_start = (0, (2, 'x'))), ValueError, r'force_modality_at_start: a shape must be a tuple of positive ints'),
    (dict(fixed_modality_shape = (4, 4, 4)), ValueError, r'fixed_modality_shape \(4, 4, 4\) fits no modality: modality 0 has 2 axes'),
    (dict(fixed_modality_shape = {True: (3,)}), TypeError, r'fixed_modality_shape keys must be modality indices, got True'),   # not modality 1
    (dict(fixed_modality_shape = {2: (3,)}), ValueError, r'fixed_modality_shape names modality 2, but the model has 2'),
])
def test_sampling_options_are_checked(keywords, error, message):
    with pytest.raises(error, match = message):
        tiny_model().sample(**keywords, **QUIET)


def test_generate_text_only_checks_its_sampling_options():
    model = tiny_model()
    with pytest.raises(ValueError, match = 'temperature must be finite and >= 0'):
        model.generate_text_only(torch.tensor([[1]]), 6, temperature = -1.)
    with pytest.raises(ValueError, match = r'min_p must lie in \[0, 1\]'):
        model.generate_text_only(torch.tensor([[1]]), 6, min_p = 2.)
    with pytest.raises(TypeError, match = r"seq_len must be an int, got float|parameter 'seq_len'"):
        model.generate_text_only(torch.tensor([[1]]), 6.)


def test_one_fixed_shape_applies_to_the_modalities_it_fits():
    model = Transfusion(num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2,), (3,)),
                        add_modality_shape_tokens = (True, False), transformer = dict(dim = 32, depth = 1))
    sample = model.sample(force_modality_at_start = 0, fixed_modality_shape = (5,), modality_steps = 1,
                          stop_after_modality = True, **QUIET)
    assert sample[0][1].shape == (5, 8)   # modality 1's shape is fixed at (3,): (5,) is not for it


@pytest.mark.parametrize('keywords, message', [
    (dict(modality_type = 5), r'modality_type 5 is not a modality of this model \(2 modalities\)'),
    (dict(batch_size = 0), 'batch_size must be at least 1, got 0'),
    (dict(fixed_modality_shape = (3, 5)), r'fixed_modality_shape: shape \(3, 5\) for modality 0 must be divisible by its downsample factor 2'),
    (dict(modality_type = True), 'modality_type must be an int, got bool'),     # not modality 1
    (dict(batch_size = 2.), "batch_size must be an int, got float|parameter 'batch_size'"),   # the latter: debug mode
])
def test_generate_modality_only_checks_its_arguments(keywords, message):
    model = tiny_model(modality_downsample = (2, 1), modality_default_shape = ((2, 4), (3,)))
    with pytest.raises((ValueError, TypeError), match = message):
        model.generate_modality_only(**keywords)


def test_generate_modality_only_takes_a_zero_axis_shape():
    model = tiny_model(modality_default_shape = (None, (3,)))
    assert model.generate_modality_only(fixed_modality_shape = (), modality_steps = 1).shape == (1, 8)


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


def _reachable_shapes(num_axes, max_value: int, budget: int) -> set:
    """Every shape that decoding restricted to `allowed` can produce within `budget` tokens after
    the begin token; asserts that each is written as training writes it and that no reachable
    state is a dead end (no allowed token)."""
    import copy
    shapes, stack = set(), [(ShapeDecoder(Vocabulary(16, 1), num_axes, max_value), [])]
    while stack:
        decoder, written = stack.pop()
        options = decoder.allowed(budget - len(written))
        assert options or not written, (num_axes, max_value, budget, written)   # only the first step may find none
        for token in options:
            child = copy.deepcopy(decoder)
            child.push(token)
            if child.done:
                assert written + [token] == decoder.vocab.shape_ids(child.shape)   # canonical: no leading zeros, no empty axis
                assert len(written) + 1 + math.prod(child.shape) + 1 <= budget   # shape tokens, latents, end
                shapes.add(child.shape)
            else:
                stack.append((child, written + [token]))
    return shapes


def _shapes_that_fit(vocab, axis_counts, max_value: int, budget: int) -> set:
    """Brute force: positive axes up to max_value, one of the axis counts, shape tokens + latents +
    end within budget. Adding an axis never shortens an instance, so longer prefixes are cut."""
    fits = lambda shape: len(vocab.shape_ids(shape)) + math.prod(shape) + 1 <= budget
    shapes, prefixes = set(), [()]
    while prefixes:
        prefix = prefixes.pop()
        if len(prefix) in axis_counts and fits(prefix):
            shapes.add(prefix)
        if len(prefix) < max(axis_counts):
            prefixes += [prefix + (v,) for v in range(1, max_value + 1) if fits(prefix + (v,))]
    return shapes


@pytest.mark.parametrize('num_axes', [None, 0, 1, 2, 3])
@pytest.mark.parametrize('max_value', [1, 3, 12])
def test_shape_grammar_reaches_exactly_the_shapes_that_fit(num_axes, max_value):
    """Decoding under the constraint yields exactly the shapes a brute-force enumeration accepts:
    positive axes up to max_value, the given number of axes (any up to MAX_AXES when None), and
    shape tokens + latents + end within the budget; the begin token is offered exactly when one fits."""
    from transfusion_pytorch.tokens import MAX_AXES, min_instance_length
    vocab = Vocabulary(16, 1)
    axis_counts = range(MAX_AXES + 1) if num_axes is None else [num_axes]
    for budget in range(0, 16):
        expected = _shapes_that_fit(vocab, axis_counts, max_value, budget)
        assert _reachable_shapes(num_axes, max_value, budget) == expected, budget
        assert bool(expected) == (min_instance_length(num_axes, True, None) - 1 <= budget), budget

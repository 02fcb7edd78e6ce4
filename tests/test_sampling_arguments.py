"""Sampling entry points check their arguments: a wrong kind or value is refused, naming it, and NumPy ints and bools pass as Python's do."""
import pytest
import torch
from torch import randint, randn

from conftest import tiny_model
from test_sampling import QUIET


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

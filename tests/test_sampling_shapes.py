"""Sampled shapes and lengths: the shape grammar yields exactly the shapes that fit, and samples keep to max_length and max_shape_value."""
import math

import pytest
import torch

from transfusion_pytorch import Transfusion, sampling
from transfusion_pytorch.tokens import ShapeDecoder, Vocabulary

from conftest import tiny_model
from test_sampling import QUIET, is_modality


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


def test_one_fixed_shape_applies_to_the_modalities_it_fits():
    model = Transfusion(num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2,), (3,)),
                        add_modality_shape_tokens = (True, False), transformer = dict(dim = 32, depth = 1))
    sample = model.sample(force_modality_at_start = 0, fixed_modality_shape = (5,), modality_steps = 1,
                          stop_after_modality = True, **QUIET)
    assert sample[0][1].shape == (5, 8)   # modality 1's shape is fixed at (3,): (5,) is not for it


def test_generate_modality_only_takes_a_zero_axis_shape():
    model = tiny_model(modality_default_shape = (None, (3,)))
    assert model.generate_modality_only(fixed_modality_shape = (), modality_steps = 1).shape == (1, 8)


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

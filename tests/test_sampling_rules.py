"""The sampler's rules at their boundaries, with hand-computed expectations: which tokens a
row may emit at each length, where a sample stops, when a forced modality fits, how prompts
are echoed and how an int seed is split over rows. Text choices are scripted (choose_tokens
replaced), so the expected items and lengths follow from the token layout alone."""
import math
import warnings

import pytest
import torch
from torch import randn

from transfusion_pytorch import Transfusion, sampling
from transfusion_pytorch.sampling_options import fixed_shapes
from transfusion_pytorch.tokens import ShapeDecoder

from conftest import tiny_model

QUIET = dict(show_progress = False, modality_steps = 1)


def script_choices(monkeypatch, pick):
    """Replace the sampler's token choice by pick(call_index, allowed_ids) for a single row;
    returns the list of allowed id sets, one per call."""
    seen = []

    def choose(logits, temperature, min_p, allowed, generators):
        assert allowed.shape[0] == 1
        ids = set(torch.nonzero(allowed[0]).flatten().tolist())
        seen.append(ids)
        return torch.tensor([pick(len(seen) - 1, ids)])

    monkeypatch.setattr(sampling, 'choose_tokens', choose)
    return seen


def expected_text_phase_ids(model, budget: int, nonempty: bool, fixed: dict) -> set:
    """Text ids, the begin token of every modality whose smallest instance (begin, shape tokens,
    latents, end) fits in `budget`, and EOS once the sample holds something."""
    vocab = model.vocab
    ids = set(range(vocab.num_text_tokens))
    for m, spec in enumerate(model.config.modalities):
        if m in fixed:
            shape = spec.token_shape(fixed[m])
            smallest = 1 + len(vocab.shape_ids(shape)) + math.prod(shape) + 1
        else:   # every axis 1: a digit per axis, a separator between axes, the shape end; one latent
            smallest = 1 + max(2 * spec.num_axes, 1) + 1 + 1
        if smallest <= budget:
            ids.add(vocab.begin[m])
    if nonempty:
        ids.add(vocab.eos)
    return ids


@pytest.mark.parametrize('fixed', [{}, {0: (1, 2), 1: (2,)}])
@pytest.mark.parametrize('prompt_length', [0, 2])
def test_text_steps_offer_exactly_the_tokens_that_fit(monkeypatch, fixed, prompt_length):
    """A row that always writes text token 0 is offered, at every length n < max_length, the
    text ids, the begin tokens whose smallest instance fits in max_length - n, and EOS unless
    the sample is still empty; it stops at exactly max_length tokens (BOS included)."""
    model = tiny_model()
    prompt = torch.arange(prompt_length) + 3 if prompt_length else None
    max_length = 12
    seen = script_choices(monkeypatch, lambda call, ids: 0)
    sample = model.sample(prompt, max_length = max_length, fixed_modality_shape = fixed or None, **QUIET)
    start = 1 + prompt_length     # BOS and prompt
    assert len(seen) == max_length - start
    for call, ids in enumerate(seen):
        budget = max_length - start - call
        assert ids == expected_text_phase_ids(model, budget, prompt_length > 0 or call > 0, fixed), (call, budget)
    assert torch.equal(sample[-1], torch.zeros(max_length - start, dtype = torch.long))
    assert len(sample) == (2 if prompt_length else 1)


def test_begin_tokens_follow_the_token_grid_of_a_fixed_shape_under_a_unet(monkeypatch):
    """With a U-Net a fixed data shape is measured in tokens: (4, 6) downsampled by 2 is a (2, 3)
    grid, whose smallest instance is begin, '2 , 3 :', 6 latents, end = 12 tokens (not the 30 of
    a (4, 6) grid), and (8,) downsampled by 4 takes 6. Each begin token is offered exactly while
    its instance fits."""
    model = Transfusion(num_text_tokens = 16, dim_latent = (4, 3), modality_default_shape = ((4, 6), (8,)),
                        modality_downsample = (2, 4), transformer = dict(dim = 32, depth = 1))
    fixed, max_length = {0: (4, 6), 1: (8,)}, 16
    seen = script_choices(monkeypatch, lambda call, ids: 0)
    model.sample(max_length = max_length, fixed_modality_shape = fixed, **QUIET)
    assert len(seen) == max_length - 1
    for call, ids in enumerate(seen):
        budget = max_length - 1 - call
        assert ids == expected_text_phase_ids(model, budget, call > 0, fixed), (call, budget)
        assert (model.vocab.begin[0] in ids, model.vocab.begin[1] in ids) == (budget >= 12, budget >= 6), (call, budget)


def test_one_fixed_shape_is_not_given_to_the_modalities_it_does_not_fit():
    """fixed_modality_shape = (5,) fits modality 0 only (modality 1 has no shape tokens, its shape
    fixed at (3,)): a forced modality-1 instance keeps its own shape, and the sample is valid input."""
    model = Transfusion(num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2,), (3,)),
                        add_modality_shape_tokens = (True, False), transformer = dict(dim = 32, depth = 1))
    assert fixed_shapes(model, (5,)) == {0: (5,)}
    sample = model.sample(force_modality_at_start = 1, fixed_modality_shape = (5,), stop_after_modality = True, **QUIET)
    assert sample[0][0] == 1 and sample[0][1].shape == (3, 4)
    model.pack([sample])


def test_scripted_tokens_give_the_expected_items(monkeypatch):
    """Text, a begin token and its shape tokens, more text, EOS: the output is the text before
    the instance, the instance with the decoded shape, the text after it, in that order."""
    model = tiny_model()
    vocab = model.vocab
    d = vocab.digits
    script = [3, 5, vocab.begin[0], d[1], vocab.axis_separator, d[2], vocab.shape_end,
              7, vocab.begin[1], 9, 9, vocab.eos]
    seen = script_choices(monkeypatch, lambda call, ids: script[call])
    sample = model.sample(torch.tensor([1]), max_length = 40, fixed_modality_shape = {1: (3,)}, **QUIET)
    assert len(seen) == len(script)
    assert all(token in ids for token, ids in zip(script, seen))
    kinds = [(item[0], tuple(item[1].shape)) if isinstance(item, tuple) else item.tolist() for item in sample]
    assert kinds == [[1], [3, 5], (0, (1, 2, 8)), [7], (1, (3, 4)), [9, 9]]


@pytest.mark.parametrize('options, instance_length', [
    (dict(modality_downsample = 2), 1 + 2 + 2 + 1),           # begin, '2 :', a 2-token grid, end
    (dict(add_modality_shape_tokens = False), 1 + 4 + 1),     # begin, 4 latents, end: no shape tokens
])
def test_text_after_an_instance_fills_max_length_exactly(monkeypatch, options, instance_length):
    """An instance costs its begin and end tokens, its shape tokens (none when they are off) and
    one latent token per token-grid cell (the data shape divided by the downsample factor):
    after a forced (4,) instance, text fills the rest of max_length exactly."""
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (4,), transformer = dict(dim = 32, depth = 1), **options)
    script_choices(monkeypatch, lambda call, ids: 0)
    for max_length in (1 + instance_length + 2, 14):
        sample = model.sample(max_length = max_length, force_modality_at_start = (0, (4,)), **QUIET)
        assert sample[0][0] == 0 and sample[0][1].shape == (4, 8)
        assert torch.equal(sample[1], torch.zeros(max_length - 1 - instance_length, dtype = torch.long)), max_length
        assert model.pack([sample]).length == max_length + 1      # + EOS, which the sample does not hold


@pytest.mark.parametrize('force, smallest', [
    (1, 1 + 1 + 2 + 1 + 1),                  # BOS, begin, '1 :', one latent, end
    (0, 1 + 1 + 4 + 1 + 1),                  # BOS, begin, '1 , 1 :', one latent, end
    ((1, (3,)), 1 + 1 + 2 + 3 + 1),          # BOS, begin, '3 :', three latents, end
    ((0, (2, 3)), 1 + 1 + 4 + 6 + 1),
])
def test_a_forced_modality_is_refused_exactly_when_it_cannot_fit(monkeypatch, force, smallest):
    """force_modality_at_start is accepted at the smallest max_length that holds the instance
    (a free shape then decodes to all ones) and refused below it with the same message, also
    where the forced begin and shape tokens alone would fill max_length."""
    model = tiny_model()
    script_choices(monkeypatch, lambda call, ids: min(ids))   # the lowest allowed id: digit 1 before ',' and ':'
    sample = model.sample(max_length = smallest, force_modality_at_start = force, **QUIET)
    modality = force[0] if isinstance(force, tuple) else force
    axes = force[1] if isinstance(force, tuple) else (1,) * model.config.modalities[modality].num_axes
    assert len(sample) == 1 and sample[0][0] == modality and tuple(sample[0][1].shape[:-1]) == axes
    for too_small in range(2, smallest):   # also where the begin and shape tokens alone fill max_length
        with pytest.raises(ValueError, match = f'sample 0: max_length={too_small} leaves no room for modality {modality} after the prompt'):
            model.sample(max_length = too_small, force_modality_at_start = force, **QUIET)
    with pytest.raises(ValueError, match = 'sample 0: the prompt takes 31 tokens, which leaves no room under max_length=12'):
        model.sample(torch.randint(0, 16, (30,)), max_length = 12, force_modality_at_start = force, **QUIET)   # the prompt is to blame


def test_an_int_seed_gives_row_r_the_seed_plus_r():
    """seed = s samples row r as sample(prompt_r, seed = s + r) would (documented): the rows of
    equal prompts then differ."""
    model = tiny_model()
    kwargs = dict(max_length = 16, text_min_p = 0., **QUIET)
    rows = model.sample_many([None, None, torch.tensor([4])], seed = 5, **kwargs)
    for r, (prompt, row) in enumerate(zip([None, None, torch.tensor([4])], rows)):
        one = model.sample(prompt, seed = 5 + r, **kwargs)
        assert [torch.is_tensor(item) for item in one] == [torch.is_tensor(item) for item in row], r
        for a, b in zip(one, row):   # text exactly, latents up to batched-vs-single rounding
            torch.testing.assert_close(a, b, atol = 1e-5, rtol = 1e-5)
    assert not torch.equal(rows[0][0], rows[1][0])


def test_prompt_items_are_echoed_as_given():
    """A bare floating tensor is modality 0, a (index, tensor) pair keeps its index, text comes
    back as a 1-D long tensor (a 0-d id too): the echoed prompt is the sample's first items."""
    model = tiny_model()
    image, sequence = randn(2, 3, 8), randn(3, 4)
    prompt = [image, torch.tensor([2, 4], dtype = torch.int32), (1, sequence), torch.tensor(5)]
    sample = model.sample(prompt, max_length = 30, seed = 0, **QUIET)
    assert sample[0][0] == 0 and sample[0][1] is image
    assert sample[1].dtype == torch.long and sample[1].tolist() == [2, 4]
    assert sample[2][0] == 1 and sample[2][1] is sequence
    assert sample[3].dtype == torch.long and sample[3].shape == (1,) and sample[3].tolist() == [5]


def test_length_and_shape_limits_are_inclusive():
    """max_length 2 (BOS and one token) is the least accepted; an axis equal to max_shape_value
    is accepted, one above it is not."""
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (4,), max_shape_value = 9,
                        transformer = dict(dim = 32, depth = 1))
    assert len(model.sample(max_length = 2, seed = 0, **QUIET)) == 1
    with pytest.raises(ValueError, match = 'max_length must be at least 2, got 1'):
        model.sample(max_length = 1, **QUIET)
    sample = model.sample(max_length = 20, force_modality_at_start = (0, (9,)), stop_after_modality = True, **QUIET)
    assert sample[0][1].shape == (9, 8)
    with pytest.raises(ValueError, match = r'exceeds max_shape_value=9'):
        model.sample(force_modality_at_start = (0, (10,)), **QUIET)


@pytest.mark.parametrize('prompt', [torch.tensor([], dtype = torch.long), [torch.tensor([], dtype = torch.long)] * 2])
def test_a_prompt_of_empty_text_does_not_let_a_sample_end_empty(monkeypatch, prompt):
    """EOS is offered only once the sample holds a token or an instance: an empty text prompt
    is echoed but holds neither, so a sampler that prefers EOS must still write something, and
    the sample stays valid input to forward (which refuses an empty sample)."""
    model = tiny_model()
    eos = model.vocab.eos
    seen = script_choices(monkeypatch, lambda call, ids: eos if eos in ids else 0)
    sample = model.sample(prompt, max_length = 10, **QUIET)
    assert eos not in seen[0] and eos in seen[1]
    assert [item.tolist() for item in sample] == [[]] * (len(sample) - 1) + [[0]]
    assert torch.isfinite(model([sample]))


@pytest.mark.parametrize('spare', [0, 1])
def test_the_shape_fallback_uses_the_default_shape_only_when_it_fits_with_its_end_token(monkeypatch, spare):
    """When no shape token is allowed (the grammar should prevent it; this path is defensive),
    the default shape is used only if its latents and end token fit in max_length, else the
    sample ends. Forced modality 0 (default (2, 3): 6 latents + end token), 6 + spare tokens
    left after its begin token."""
    model = tiny_model()
    monkeypatch.setattr(ShapeDecoder, 'allowed', lambda self, budget: [])
    max_length = 4 + 6 + spare                         # BOS, 2 text tokens, begin; latents, end
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        sample = model.sample(torch.tensor([1, 2]), force_modality_at_start = 0, max_length = max_length,
                              text_temperature = 0., seed = 0, **QUIET)
    messages = ' '.join(str(w.message) for w in caught)
    if spare:
        assert 'using the default shape (2, 3)' in messages
        assert sample[1][0] == 0 and sample[1][1].shape == (2, 3, 8)
    else:
        assert 'no room left' in messages
        assert not any(isinstance(item, tuple) for item in sample)

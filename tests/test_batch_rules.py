"""Rules of items.py, batch.py, tokens.py and config.py that mutation testing found unpinned: every refusal
names the sample, the item and what was expected (never an IndexError or AttributeError), the
accepted spellings of a batch (tuples, 0-d text) pack and sample as their canonical form, the
vocabulary keeps its documented id layout, and the configuration refuses values just outside its
ranges and accepts their bounds."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import Transfusion, TransfusionConfig
from transfusion_pytorch.batch import PackedBatch
from transfusion_pytorch.config import TransformerConfig
from transfusion_pytorch.tokens import Vocabulary, min_instance_length

from conftest import tiny_model

QUIET = dict(show_progress = False)
SMALL = dict(dim = 32, depth = 1, heads = 2, dim_head = 16)


def text_only_model() -> Transfusion:
    """A model without modalities."""
    return Transfusion(num_text_tokens = 16, transformer = SMALL)


def one_modality_model(**overrides) -> Transfusion:
    """One 8-d modality; its default shape (one axis of 3) unless overridden."""
    return Transfusion(**{**dict(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (3,), transformer = SMALL), **overrides})


MODELS: dict[str, Callable[[], Transfusion]] = {
    'two': tiny_model,                                                   # modality 0: (2, 3) x 8, modality 1: (3,) x 4
    'channel_first': lambda: tiny_model(channel_first_latent = True),
    'none': text_only_model,
    'one': one_modality_model,
    'zero_axes': lambda: one_modality_model(modality_default_shape = ()),
}

WHERE = 'sample 0, item 0'
REFUSALS = [
    # the expected range of modality indices, plural and singular
    ('two', [[randint(0, 16, (2,)), (2, randn(3, 4))]], ValueError,
     'sample 0, item 1: unknown modality index 2; this model has 2 modalities (0..1)'),
    ('one', [[(1, randn(3, 8))]], ValueError, f'{WHERE}: unknown modality index 1; this model has 1 modality (0..0)'),
    # a pair whose data is not a tensor at all
    ('two', [[(0, [1., 2.])]], TypeError, f'{WHERE}: modality 0 data must be a floating tensor, got list'),
    # complex is neither text nor a modality (it would otherwise be cast to text ids)
    ('two', [[torch.tensor([1 + 2j, 3 + 0j])]], TypeError,
     f'{WHERE}: unsupported dtype torch.complex64; text must be an integer tensor, a modality a floating tensor'),
    # a bare floating tensor is modality 0, which a model without modalities does not have
    ('none', [[randint(0, 16, (2,)), randn(3, 8)]], ValueError,
     'sample 0, item 1: got a floating tensor (a modality) but this model has no modalities (pass dim_latent to Transfusion)'),
    # a bare 2-tuple whose first element is not an int index is a sample of two items, read one by one
    ('two', [(torch.tensor(True), randn(3, 4))], TypeError,
     f'{WHERE}: unsupported dtype torch.bool; text must be an integer tensor, a modality a floating tensor'),
    ('two', [(torch.tensor(1.), randn(3, 4))], ValueError, f'{WHERE}: modality 0 expects latents (*axes, dim_latent=8), got shape ()'),
    ('two', [(True, randn(3, 4))], TypeError,
     f'{WHERE}: expected an integer tensor (text), a floating tensor (modality 0) or a (modality_index, tensor) pair, got bool'),
    # a sample that is neither a list of items nor an item
    ('two', [[randint(0, 16, (2,))], 5], TypeError, 'sample 1: expected a list of items, got int'),
    # 0-d latents have no channel axis to read
    ('two', [[torch.tensor(1.)]], ValueError, f'{WHERE}: modality 0 expects latents (*axes, dim_latent=8), got shape ()'),
    ('channel_first', [[torch.tensor(1.)]], ValueError,
     f'{WHERE}: modality 0 expects channel-first latents (dim_latent=8, *axes), got shape ()'),
    # fewer axes than the default shape fixes, and any axis where it fixes none
    ('two', [[randn(6, 8)]], ValueError, f'{WHERE}: modality 0 has 2 axes (default shape (2, 3)), got latent shape (6, 8) with 1'),
    ('zero_axes', [[randn(3, 8)]], ValueError, f'{WHERE}: modality 0 has 0 axes (default shape ()), got latent shape (3, 8) with 1'),
    # a latent's shape error names its own sample and item, not the other way round
    ('two', [[randint(0, 16, (2,))], [randint(0, 16, (2,)), randn(2, 3, 8), (1, randn(3, 5))]], ValueError,
     'sample 1, item 2: modality 1 expects latents (*axes, dim_latent=4), got shape (3, 5)'),
    # the first offending id of the item is the one named
    ('two', [[torch.tensor([1, 17, 20, -3])]], ValueError,
     f'{WHERE}: text id 17 is outside [0, num_text_tokens=16); ids at and above 16 are reserved for special tokens'),
]


@pytest.mark.parametrize('model_key, batch, error, message', REFUSALS)
def test_refusals_name_the_sample_the_item_and_what_was_expected(model_key, batch, error, message):
    with pytest.raises(error) as refused:
        MODELS[model_key]().pack(batch)
    assert str(refused.value) == message


def assert_same_packing(a: PackedBatch, b: PackedBatch) -> None:
    """Two packed batches hold the same tokens, layout and latents."""
    for field in ('token_ids', 'positions', 'document', 'instance', 'loss_index', 'loss_targets'):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.instance_modality == b.instance_modality and a.instance_shape == b.instance_shape
    assert all(torch.equal(x.data, y.data) for x, y in zip(a.groups, b.groups, strict = True))


def test_a_tuple_sample_is_a_pair_only_when_its_first_element_is_an_int_index():
    """(1-element text, latent) is two items although its text has one id; (0-d int, latent) is a pair."""
    model = tiny_model()
    text, image, audio = torch.tensor([3]), randn(2, 3, 8), randn(3, 4)
    assert_same_packing(model.pack([(text, image)]), model.pack([[text, image]]))
    assert_same_packing(model.pack([(torch.tensor(1), audio)]), model.pack([[(1, audio)]]))
    assert model.pack([(text, image)]).instance_modality == [0]


def test_a_tuple_batch_packs_like_a_list():
    model = tiny_model()
    samples = [[randint(0, 16, (3,)), randn(2, 3, 8)], [(1, randn(3, 4))]]
    assert_same_packing(model.pack(tuple(samples)), model.pack(samples))


def test_a_0d_text_prompt_samples_like_its_1d_form():
    """A 0-d id is one token: the uncached sampler appends the sampled text to the prompt's text
    item, which must therefore be 1-D."""
    model = text_only_model()
    kwargs = dict(max_length = 6, seed = 0, cache_kv = False, **QUIET)
    zero_d, one_d = model.sample(torch.tensor(3), **kwargs), model.sample(torch.tensor([3]), **kwargs)
    assert len(one_d) == 2 and one_d[0].tolist() == [3] and one_d[1].numel() > 0   # text was sampled after the prompt
    assert len(zero_d) == len(one_d) and all(torch.equal(a, b) for a, b in zip(zero_d, one_d))


@pytest.mark.gpu
def test_an_id_beyond_the_vocabulary_on_cuda_raises_without_a_device_assert():
    """On CUDA the id check is read back after the forward is queued; the packed ids are clamped
    into the vocabulary meanwhile, so the embedding never sees an out-of-range index (which would
    be a device-side assert that poisons the CUDA context)."""
    model = tiny_model().cuda()
    batch = [[torch.tensor([1, 10 ** 6], device = 'cuda'), randn(2, 3, 8, device = 'cuda')]]
    with pytest.raises(ValueError, match = r'^sample 0, item 0: text id 1000000 is outside'):
        model(batch)
    model([[randint(0, 16, (3,), device = 'cuda')]]).backward()   # the context is still usable
    torch.cuda.synchronize()


def test_vocabulary_ids_follow_the_documented_layout():
    """Text, ten digits, ',', ':', BOS, EOS, then begin/end per modality (tokens.py): saved
    embeddings depend on it. Only begin ids read as a modality."""
    vocab = Vocabulary(16, 2)
    assert vocab.digits == tuple(range(16, 26))
    assert (vocab.axis_separator, vocab.shape_end, vocab.bos, vocab.eos) == (26, 27, 28, 29)
    assert vocab.begin == (30, 32) and vocab.end == (31, 33) and vocab.size == 34
    for token in range(-3, vocab.size + 4):
        assert vocab.modality_of_begin(token) == {30: 0, 32: 1}.get(token), token
    assert vocab.shape_ids((3, 15)) == [19, 26, 17, 21, 27] and vocab.shape_ids(()) == [27]


@pytest.mark.parametrize('shape_tokens', [True, False])
def test_min_instance_length_of_a_fixed_shape_is_its_packed_length(shape_tokens):
    """The fewest tokens of an instance of a fixed shape is what packing it takes (begin, shape
    tokens unless they are off, latents, end)."""
    model = tiny_model(add_modality_shape_tokens = shape_tokens)
    sample_length = model.pack([[randn(2, 3, 8)]]).length
    assert min_instance_length(2, shape_tokens, (2, 3)) == sample_length - 2 == (12 if shape_tokens else 8)   # less BOS and EOS


BASE = dict(num_text_tokens = 16, dim_latent = 8, transformer = SMALL)
BAD_CONFIGURATIONS = [
    (dict(transformer = {**SMALL, 'depth': True}), 'transformer.depth must be a positive int, got True'),
    (dict(text_loss_weight = -1.), 'text_loss_weight must be a finite non-negative number, got -1.0'),
    (dict(flow_loss_weight = -.5), 'flow_loss_weight must be a finite non-negative number, got -0.5'),
    (dict(transformer = {**SMALL, 'dropout': 1.}), 'transformer.dropout must be in [0, 1), got 1.0'),
    (dict(condition_dropout = 1.), 'condition_dropout must be in [0, 1), got 1.0'),
    (dict(transformer = {**SMALL, 'dim_head': 15}), 'transformer.dim_head must be even for rotary positions, got 15'),
    (dict(transformer = {**SMALL, 'ff_mult': -2}), 'transformer.ff_mult must be a positive number, got -2'),
    (dict(transformer = {**SMALL, 'rotary_theta': 0}), 'transformer.rotary_theta must be a positive number, got 0'),
    (dict(transformer = {**SMALL, 'attention_backend': 'xformers'}),
     "transformer.attention_backend must be 'auto', 'sdpa' or 'flex', got 'xformers'"),
    (dict(transformer = {**SMALL, 'depth': 3, 'unet_skips': True}), 'transformer.unet_skips needs an even depth, got depth=3'),
    (dict(modality_default_shape = (2, 0)), 'modality_default_shape must be a tuple of positive ints, got (2, 0)'),
    (dict(modality_loss_weight = 0), 'modality loss_weight must be a positive number, got 0'),
    (dict(modality_default_shape = (4,), modality_downsample = 0), 'modality_downsample must be a positive int, got 0'),
    (dict(modality_default_shape = (2, 2), axial_rotary = True, transformer = {**SMALL, 'dim_head': 4}),
     'axial_rotary splits the dim_head / 2 rotary frequencies into 1 + 2 sections: dim_head must be at least 6'),
    (dict(modality_default_shape = (10,), max_shape_value = 9), 'modality 0 default shape (10,) exceeds max_shape_value=9'),
    (dict(alibi_heads = 1.5), 'alibi_heads must be an int in [0, heads=2], got 1.5'),
    (dict(alibi_heads = True), 'alibi_heads must be an int in [0, heads=2], got True'),   # not a switch: True would mean one head
    (dict(dim_latent = None, channel_first_latent = True),
     "['channel_first_latent'] describe modalities, but there are none: pass dim_latent (one per modality)"),
    (dict(dim_latent = ()), 'dim_latent must not be empty'),
    (dict(text_los_weight = 2.), "unknown Transfusion options ['text_los_weight']"),
]


@pytest.mark.parametrize('kwargs, message', BAD_CONFIGURATIONS)
def test_configuration_just_outside_its_range_is_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError) as refused:
        Transfusion(**{**BASE, **kwargs})
    assert str(refused.value) == message


def test_configuration_bounds_are_inclusive():
    """dim_head exactly 2 * (1 + axes) for axial rotary, a default axis exactly max_shape_value."""
    Transfusion(**{**BASE, 'modality_default_shape': (2, 2), 'axial_rotary': True, 'transformer': {**SMALL, 'dim_head': 6}})
    Transfusion(**{**BASE, 'modality_default_shape': (9,), 'max_shape_value': 9})


def test_a_config_refuses_modalities_that_are_not_modality_configs():
    with pytest.raises(ValueError, match = '^modalities must be ModalityConfig instances$'):
        TransfusionConfig(num_text_tokens = 16, transformer = TransformerConfig(**SMALL), modalities = ({'dim_latent': 8},))

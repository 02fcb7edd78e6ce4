"""Bad input raises a clear error naming the sample and item, and leaves the model unchanged."""
import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import Transfusion

from conftest import tiny_model


CASES = [
    ([[randint(0, 16, (3,)), torch.tensor([1, 16])]], ValueError, r'sample 0, item 1: text id 16 is outside \[0, num_text_tokens=16\)'),
    ([[randint(0, 16, (3,))], [torch.tensor([-1])]], ValueError, r'sample 1, item 0: text id -1'),
    ([[randn(2, 3, 5)]], ValueError, r'sample 0, item 0: modality 0 expects latents \(\*axes, dim_latent=8\)'),
    ([[(1, randn(2, 2, 4))]], ValueError, r'sample 0, item 0: modality 1 has 1 axes'),
    ([[randint(0, 16, (2,)), (2, randn(3, 4))]], ValueError, r'sample 0, item 1: unknown modality index 2'),
    ([[randint(0, 16, (2,))], []], ValueError, r'sample 1: the sample is empty'),
    ([[randn(0, 3, 8)]], ValueError, r'sample 0, item 0: modality 0 instance is empty'),
    ([[randint(0, 16, (2,)), 'hello']], TypeError, r'sample 0, item 1: expected an integer tensor'),
    ([[torch.tensor([True, False])]], TypeError, r'sample 0, item 0: unsupported dtype torch.bool'),
    ([[(0, randint(0, 3, (2, 3, 8)))]], TypeError, r'sample 0, item 0: modality 0 data must be a floating tensor'),
    ([[(0, randn(2, 3, 8), 1)]], TypeError, r'sample 0, item 0: a modality item must be a \(modality_index, tensor\) pair'),
    ([[randint(0, 16, (2, 2))]], ValueError, r'sample 0, item 0: text must be a 1-D tensor'),
    ([[randint(0, 16, (2,)), randn(2, 3, 8).fill_(float('nan'))]], ValueError, r'sample 0, item 1: modality latent contains NaN or inf'),
    ([], ValueError, 'the batch is empty'),
    ('text', TypeError, 'a batch must be a list of samples'),
    ([[randint(0, 16, (2,)), randn(2, 3, 8, device = 'meta')]], TypeError, r'sample 0, item 1: expected a dense tensor holding values, got a meta tensor'),
    ([[(0, randn(2, 3, 8).to_sparse())]], TypeError, r'sample 0, item 0: expected a dense tensor holding values, got a torch.sparse_coo tensor'),
    ([[randint(0, 16, (3,)).to_sparse()]], TypeError, r'sample 0, item 0: expected a dense tensor holding values, got a torch.sparse_coo'),
    ([[randint(0, 16, (2,))], [randint(0, 16, (3,), device = 'meta')]], TypeError, r'sample 1, item 0: expected a dense tensor holding values, got a meta'),
]


@pytest.mark.parametrize('batch, error, message', CASES)
def test_bad_input_raises_and_leaves_model_unchanged(batch, error, message):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match = message):
        loss = model(batch)
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_tokens_off_requires_the_fixed_shape():
    model = tiny_model(add_modality_shape_tokens = False)
    with pytest.raises(ValueError, match = r'sample 0, item 0: modality 0 has shape tokens off, so its shape is fixed at \(2, 3\)'):
        model([[randn(3, 3, 8)]])


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_text_tokens = 0), 'num_text_tokens must be a positive int'),
    (dict(transformer = dict(dim = 64)), 'transformer needs at least dim and depth'),
    (dict(transformer = dict(dim = 64, depth = 2, heads = 0)), r'transformer.heads must be a positive int'),
    (dict(transformer = dict(dim = 64, depth = 2, width = 3)), r"unknown transformer options \['width'\]"),
    (dict(dim_latent = (8, 4), modality_default_shape = ((2,), (3,), (4,))), 'modality_default_shape has 3 entries but there are 2 modalities'),
    (dict(dim_latent = -1), 'dim_latent must be a positive int'),
    (dict(time_sampling = 'beta'), "time_sampling must be 'uniform' or 'logit_normal'"),
    (dict(condition_dropout = 1.5), r'condition_dropout must be in \[0, 1\)'),
    (dict(dim_latent = 8, modality_default_shape = None, add_modality_shape_tokens = False), 'needs a modality_default_shape'),
    (dict(transformer = dict(dim = 64, depth = 2, compile_options = {'cpp_wraper': True})), 'compile_options: Unexpected optimization option cpp_wraper$'),
    (dict(transformer = dict(dim = 64, depth = 2, compile_options = {'cpp_wrapper': [1]})), r"compile_options\['cpp_wrapper'\] must be a bool, number or string"),
    (dict(transformer = dict(dim = 64, depth = 2, compile_options = 'cpp_wrapper')), 'compile_options must be a dict'),
    (dict(transformer = dict(dim = 32, depth = 2, ff_mult = 0.04)), r'leaves the feed-forward with int\(dim \* ff_mult \* 2 / 3\) = 0 hidden units'),
    (dict(transformer = dict(dim = 64, depth = 2, rotary_theta = '1e4')), "transformer.rotary_theta must be a positive number, got '1e4'"),
    (dict(text_loss_weight = float('inf')), 'text_loss_weight must be a finite non-negative number, got inf'),
    (dict(dim_latent = None, modality_default_shape = (4, 4), modality_downsample = 2),
     r"\['modality_default_shape', 'modality_downsample'\] describe modalities, but there are none: pass dim_latent"),
    (dict(modalities = ()), r'modalities is built from dim_latent .* use Transfusion.from_config'),
    (dict(transformer = dict(dim = 64, depth = 2, qk_norm = 'False')), "transformer.qk_norm must be True or False, got 'False'"),
    (dict(transformer = dict(dim = 64, depth = 2, checkpoint_activations = 1)), 'transformer.checkpoint_activations must be True or False, got 1'),
    (dict(causal_modality_attention = 'no'), "causal_modality_attention must be True or False, got 'no'"),
    (dict(modality_experts = None), 'modality_experts must be True or False, got None'),
    (dict(channel_first_latent = ['yes']), "channel_first_latent must be True or False, got 'yes'"),
    (dict(transformer = dict(dim = 64, depth = 2, compile_stack = True)), 'compile_stack .* needs compile_blocks=True'),
    (dict(transformer = dict(dim = 64, depth = 2, compile_blocks = True, compile_stack = True, checkpoint_activations = True,
                             compile_options = {'cpp_wrapper': True})), 'checkpoint_activations with compile_stack cannot use compile_options cpp_wrapper'),
    (dict(modality_default_shape = (4,), modality_unet_dim = 32), 'modality_unet_dim=32 is the width of the U-Net that modality_downsample > 1 builds'),
    # one value for all modalities that fits only some: the message names the modality and the per-modality form
    (dict(dim_latent = (8, 4), modality_default_shape = ((4, 4), (2,)), modality_downsample = (2, 1), modality_unet_dim = 8),
     r'modality 1: modality_unet_dim=8 is the width .* but downsample is 1; modality_unet_dim applied to every modality \(a tuple gives one value per modality\)$'),
    (dict(dim_latent = (8, 4), modality_default_shape = ((4, 4), (2,)), modality_downsample = (2, 1), modality_unet_dim = (None, 8)),
     r'modality 1: modality_unet_dim=8 is the width .* but downsample is 1$'),   # given per modality: no hint
])
def test_bad_configuration_explains_itself(kwargs, message):
    base = dict(num_text_tokens = 16, dim_latent = 8, transformer = dict(dim = 64, depth = 2))
    with pytest.raises(ValueError, match = message):
        Transfusion(**{**base, **kwargs})


def draws_and_errors():
    """(keywords of a call, error, message): caller-given draws that must be refused."""
    batch = [[randint(0, 16, (2,)), randn(2, 3, 8)], [(1, randn(3, 4))]]
    noise = [randn(2, 3, 8), randn(3, 4)]
    return batch, [
        (dict(times = torch.tensor([float('nan'), .5])), ValueError, r'times must lie in \[0, 1\].*instance 0 has nan'),
        (dict(times = torch.tensor([.5, 1.5])), ValueError, r'instance 1 has 1.5'),
        (dict(times = torch.tensor([-.25, .5])), ValueError, r'instance 0 has -0.25'),
        (dict(times = torch.rand(3)), ValueError, r'one value per modality instance \(2\), got 3'),
        (dict(times = torch.rand(2, 1)), (ValueError, TypeError), r"times must hold one value per modality instance, of shape \(2,\), got shape \(2, 1\)|parameter 'times'"),
        (dict(times = torch.tensor([True, False])), TypeError, r"times must be real numbers, got a tensor of torch.bool|parameter 'times'"),
        (dict(times = 'half'), TypeError, r"times must be a tensor or a list of floats|parameter 'times'"),   # the latter: debug mode
        (dict(noise = [noise[0], noise[1].fill_(float('inf'))]), ValueError, 'noise for instance 1 holds non-finite values'),
        (dict(noise = [noise[0], [1., 2.]]), TypeError, r"noise for instance 1 must be a floating tensor, got list|'noise': \[f32"),
        (dict(noise = [noise[0].long(), noise[1]]), TypeError, 'noise for instance 0 must be a floating tensor, got torch.int64'),
        (dict(noise = randn(2, 3, 4)), TypeError, r"noise must be a list of tensors, one per modality instance .* got Tensor|parameter 'noise'"),
    ]


@pytest.mark.parametrize('case', range(len(draws_and_errors()[1])))
def test_bad_draws_raise_before_any_draw_and_leave_model_unchanged(case):
    batch, cases = draws_and_errors()
    keywords, error, message = cases[case]
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    for call in (lambda: model(batch, **keywords), lambda: model.predict(batch, **keywords)):
        with pytest.raises(error, match = message):
            call()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('batch, keywords, message', [
    (torch.zeros(0, 8, dtype = torch.long), {}, r'text-only training expects token ids of shape \(b, n\) with b >= 1'),
    (randint(0, 16, (2, 5)), dict(modality_type = 1), 'an integer tensor batch is text-only language modelling'),
    (randint(0, 16, (2, 5)), dict(times = torch.rand(1)), 'an integer tensor batch is text-only language modelling'),
])
def test_text_only_batches_refuse_what_does_not_apply(batch, keywords, message):
    with pytest.raises(ValueError, match = message):
        tiny_model()(batch, **keywords)


@pytest.mark.parametrize('modality_type, error, message', [
    (2, ValueError, 'modality_type 2: this model has 2 modalities'),
    (1., TypeError, r'modality_type must be a modality index \(an int\), got float|parameter .modality_type.'),
    (True, TypeError, r'modality_type must be a modality index \(an int\), got bool'),
])
def test_modality_only_batches_name_a_bad_modality_type(modality_type, error, message):
    """A modality-only batch's modality_type is the caller's argument, not a 'sample 0, item 0'."""
    with pytest.raises(error, match = message):
        tiny_model()(randn(2, 3, 4), modality_type = modality_type)


def test_numpy_ints_index_modalities_in_batches():
    """NumPy ints and 0-d integer tensors name modalities in items and as modality_type."""
    np = pytest.importorskip('numpy')
    model = tiny_model()
    draws = dict(times = torch.tensor([.3, .6]), noise = [torch.zeros(3, 4), torch.ones(3, 4)])
    data = randn(2, 3, 4)
    expected = model(data, modality_type = 1, **draws)
    torch.testing.assert_close(model(data, modality_type = np.int64(1), **draws), expected)
    torch.testing.assert_close(model([[(np.int32(1), data[0])], [(np.int64(1), data[1])]], **draws), expected)
    torch.testing.assert_close(model(data, modality_type = torch.tensor(1), **draws), expected)   # a 0-d tensor, as in items


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int8, torch.int16, torch.uint16])
def test_text_of_any_integer_dtype_is_read_as_ids(dtype):
    """Range checks in a small dtype wrapped (uint8 5 >= 256) or did not exist (uint16), so valid
    byte ids were refused as outside the vocabulary."""
    model = Transfusion(num_text_tokens = 256, dim_latent = 8, modality_default_shape = (2,), transformer = dict(dim = 32, depth = 1))
    ids = torch.tensor([[5, 6, 7, 8]], dtype = dtype)
    torch.testing.assert_close(model(ids), model(ids.long()))
    draws = dict(times = torch.tensor([.5]), noise = [torch.zeros(2, 8)])
    torch.testing.assert_close(model([[ids[0], torch.ones(2, 8)]], **draws), model([[ids[0].long(), torch.ones(2, 8)]], **draws))
    assert model.generate_text_only(ids, 6, temperature = 0.).shape == (1, 2)


def test_a_bare_pair_with_a_tensor_index_is_one_modality_item():
    model = tiny_model()
    x = randn(3, 4)
    assert model.pack([(torch.tensor(1), x)]).instance_modality == model.pack([(1, x)]).instance_modality == [1]


def test_a_model_without_modalities_says_so():
    model = Transfusion(num_text_tokens = 16, transformer = dict(dim = 32, depth = 1))
    for batch, where in (([[(0, randn(3, 8))]], 'sample 0, item 0: '), (randn(2, 3, 8), 'a floating tensor batch is modality-only training, ')):
        with pytest.raises(ValueError, match = where + r'.*this model has no modalities \(pass dim_latent'):
            model(batch)


@pytest.mark.parametrize('batch, error, message', [
    ([[(torch.tensor(1.), randn(3, 4))]], TypeError, r'sample 0, item 0: modality index must be an int, got Tensor'),
    ([[(True, randn(3, 4))]], TypeError, r'sample 0, item 0: modality index must be an int, got bool'),
    ([(torch.tensor(True), randn(3, 4))], TypeError, r'sample 0, item 0'),
    ([[(torch.tensor(True), randn(3, 4))]], TypeError, r'sample 0, item 0: modality index must be an int, got Tensor'),
    ([[(torch.tensor(1), randn(3, 4))]], None, None),
    ([[randint(0, 16, (2,)), (-1, randn(3, 4))]], ValueError, r'sample 0, item 1: unknown modality index -1'),
    ([[torch.zeros(0, dtype = torch.long), torch.zeros(0, dtype = torch.long)]], ValueError, r'sample 0: the sample is empty'),
    ([[randint(0, 16, (2,)), randn(2, 3, 8).fill_(float('-inf'))]], ValueError, r'sample 0, item 1: modality latent contains NaN or inf'),
])
def test_modality_indices_that_are_not_ints_and_hidden_empties_are_refused(batch, error, message):
    """A modality index is an int in range: not a float tensor, a bool, or a bare pair whose
    bool index would read as 1; a sample of empty text is empty; -inf is not a finite latent.
    A 0-d integer tensor is an index."""
    if error is None:
        assert tiny_model().pack(batch).instance_modality == [1]
        return
    with pytest.raises(error, match = message):
        tiny_model()(batch)


def test_channel_first_latents_must_lead_with_dim_latent():
    model = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                        transformer = dict(dim = 32, depth = 1))
    model([[randn(8, 2, 2)]])
    with pytest.raises(ValueError, match = r'sample 0, item 0: modality 0 expects channel-first latents \(dim_latent=8, \*axes\), got shape \(2, 2, 8\)'):
        model([[randn(2, 2, 8)]])


def test_an_axis_of_exactly_max_shape_value_is_accepted():
    """max_shape_value is the largest axis the shape tokens may encode: equal passes, one more is refused."""
    model = tiny_model(max_shape_value = 9)
    model([[(1, randn(9, 4))]])
    with pytest.raises(ValueError, match = r'sample 0, item 0: modality 1 axis lengths \(10,\) exceed max_shape_value=9'):
        model([[(1, randn(10, 4))]])


def test_empty_text_items_change_nothing():
    """Empty text tensors contribute no token: a batch packs and scores exactly as without them,
    and an instance followed only by empty text is not followed by text (no noise limiting)."""
    model = tiny_model(noise_limit_before_text = True)
    empty = torch.zeros(0, dtype = torch.long)
    text, image, audio = randint(0, 16, (3,)), randn(2, 3, 8), randn(3, 4)
    with_empty, without = [[empty, text, image, empty], [(1, audio), empty]], [[text, image], [(1, audio)]]
    a, b = model.pack(with_empty), model.pack(without)
    for field in ('token_ids', 'positions', 'document', 'instance', 'loss_index', 'loss_targets', 'instance_followed_by_text'):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not a.instance_followed_by_text.any()
    draws = dict(times = torch.tensor([.3, .6]), noise = [randn(2, 3, 8), randn(3, 4)])
    torch.testing.assert_close(model(with_empty, **draws), model(without, **draws))


def test_a_sample_may_be_a_single_bare_item():
    """A sample that is one item (text, a modality tensor, or a pair) packs as the list of that item."""
    model = tiny_model()
    text, image, audio = randint(0, 16, (5,)), randn(2, 3, 8), randn(3, 4)
    bare, listed = model.pack([text, image, (1, audio)]), model.pack([[text], [image], [(1, audio)]])
    for field in ('token_ids', 'positions', 'document', 'instance', 'loss_index', 'loss_targets'):
        assert torch.equal(getattr(bare, field), getattr(listed, field)), field
    assert bare.instance_modality == [0, 1] and bare.instance_shape == [(2, 3), (3,)]

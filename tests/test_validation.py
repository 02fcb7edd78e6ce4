"""Bad input raises a clear error naming the sample and item, and leaves the model unchanged."""
import pytest
import torch
from torch import nn, randint, randn

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


def test_encoder_errors_name_the_item():
    model = Transfusion(num_text_tokens = 8, dim_latent = 16, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = nn.Conv2d(3, 16, 1), transformer = dict(dim = 32, depth = 1))
    with pytest.raises(ValueError, match = r'sample 1 item 0: modality 0 encoder failed on input of shape \(4, 2, 2\)'):
        model([[randn(3, 2, 2)], [randn(4, 2, 2)]])


def test_frozen_encoder_with_batchnorm_keeps_its_statistics():
    encoder = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    model = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = encoder, transformer = dict(dim = 32, depth = 1))
    model.train()
    before = encoder[1].running_mean.clone()
    model([[randn(3, 2, 2) * 5 + 3]]).backward()
    assert torch.equal(encoder[1].running_mean, before)


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
])
def test_bad_configuration_explains_itself(kwargs, message):
    base = dict(num_text_tokens = 16, dim_latent = 8, transformer = dict(dim = 64, depth = 2))
    with pytest.raises(ValueError, match = message):
        Transfusion(**{**base, **kwargs})

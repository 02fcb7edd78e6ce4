"""Per-modality U-Nets (modality_downsample): the transformer sees fewer tokens, shapes stay at
full resolution for the user, shape tokens describe the transformer-side grid, sampling works."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import randint, randn

from transfusion_pytorch import Transfusion
from transfusion_pytorch.unet import LatentUNet

from test_sampling import assert_samples_equal

QUIET = dict(show_progress = False)


def unet_model(**overrides):
    kwargs = dict(num_text_tokens = 16, dim_latent = (4, 3), modality_default_shape = ((4, 6), (8,)),
                  modality_downsample = (2, 4), transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32))
    kwargs.update(overrides)
    return Transfusion(**kwargs)


@pytest.mark.parametrize('shape', [(8,), (4, 6), (2, 4, 6)])
def test_unet_round_trips_shapes_for_any_number_of_axes(shape):
    unet = LatentUNet(dim_latent = 5, dim_model = 32, factor = 2, axes = len(shape))
    x = randn(3, math.prod(shape), 5)
    tokens, skip = unet.encode(x, shape)
    assert tokens.shape == (3, math.prod(shape) // 2 ** len(shape), 32)
    assert unet.decode(tokens, skip, shape).shape == x.shape


def test_transformer_sees_fewer_tokens_and_shape_tokens_describe_its_grid():
    model = unet_model()
    packed = model.pack([[randint(0, 16, (3,)), randn(4, 6, 4), (1, randn(16, 3))]])
    assert (packed.instance >= 0).sum().item() == 2 * 3 + 4
    ids = packed.token_ids.tolist()
    begin = ids.index(model.vocab.begin[0])
    assert ids[begin + 1:begin + 5] == model.vocab.shape_ids((2, 3))
    loss, parts = model([[randint(0, 16, (3,)), randn(4, 6, 4), (1, randn(16, 3))]], return_breakdown = True)
    loss.backward()
    assert torch.isfinite(loss) and set(parts.flow_per_modality) == {0, 1}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.modalities.projections.parameters())


def test_shapes_must_divide_by_the_factor():
    model = unet_model()
    with pytest.raises(ValueError, match = r'sample 0, item 1: modality 0 is downsampled by 2 on every axis'):
        model([[randint(0, 16, (3,)), randn(5, 6, 4)]])
    with pytest.raises(ValueError, match = 'must be divisible by modality_downsample'):
        unet_model(modality_default_shape = ((3, 6), (8,)))


def test_unet_sampling_cached_equals_uncached_at_full_resolution():
    model = unet_model()
    kwargs = dict(max_length = 60, text_temperature = 0., modality_steps = 3, seed = 4, **QUIET)
    for force in ((0, (4, 2)), 0, (1, (12,))):
        cached = model.sample(force_modality_at_start = force, cache_kv = True, **kwargs)
        assert_samples_equal(cached, model.sample(force_modality_at_start = force, cache_kv = False, **kwargs))
        modality, data = cached[0]
        factor = (2, 4)[modality]
        assert data.shape[-1] == (4, 3)[modality] and all(a % factor == 0 for a in data.shape[:-1])
    assert model.generate_modality_only(2, 0, modality_steps = 2).shape == (2, 4, 6, 4)
    assert torch.isfinite(model(model.sample_many([None, randint(0, 16, (2,))], max_length = 40, modality_steps = 1, seed = 0, **QUIET)))


def test_unet_learns_a_toy_image():
    """Overfit one fixed instance at fixed time and noise through the U-Net."""
    model = unet_model()
    batch = [[randint(0, 16, (2,)), randn(4, 6, 4)]]
    times, noise = torch.tensor([0.3]), [randn(4, 6, 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    first = None
    for _ in range(150):
        _, parts = model(batch, times = times, noise = noise, return_breakdown = True)
        first = first or parts.flow.item()
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
    assert parts.flow.item() < 0.1 * first


def test_flow_loss_equals_predict_mse_with_a_unet():
    """With U-Nets around the transformer, the flow loss is the MSE between predict()'s
    velocities (the U-Net's skip fed the noised input, not the data) and x1 - noise."""
    model = unet_model().eval()
    batch = [[randint(0, 16, (3,)), randn(4, 6, 4), (1, randn(16, 3))]]
    times, noise = torch.tensor([.3, .6]), [randn(4, 6, 4), randn(16, 3)]
    pred = model.predict(batch, times, noise)
    _, parts = model(batch, times = times, noise = noise, return_breakdown = True)
    for m in (0, 1):
        torch.testing.assert_close(parts.flow_per_modality[m], F.mse_loss(pred.velocities[m], pred.targets[m]))
        torch.testing.assert_close(pred.targets[m], (batch[0][1] if m == 0 else batch[0][2][1]) - noise[m])

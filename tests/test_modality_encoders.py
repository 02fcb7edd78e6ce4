"""User modality encoders: their errors name the item, and refused batches, predict and sampling leave their state and mode as they were."""
import pytest
import torch
from torch import nn, randn

from transfusion_pytorch import Transfusion


def test_encoder_errors_name_the_item():
    model = Transfusion(num_text_tokens = 8, dim_latent = 16, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = nn.Conv2d(3, 16, 1), transformer = dict(dim = 32, depth = 1))
    with pytest.raises(ValueError, match = r'sample 1 item 0: modality 0 encoder failed on input of shape \(4, 2, 2\)'):
        model([[randn(3, 2, 2)], [randn(4, 2, 2)]])


class Pair(nn.Module):
    """An encoder returning (latent, extra), as VAE-style encoders often do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 1)

    def forward(self, x):
        return self.proj(x), x


def test_encoder_returning_a_tuple_is_named():
    model = Transfusion(num_text_tokens = 8, dim_latent = 16, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = Pair(), transformer = dict(dim = 32, depth = 1))
    with pytest.raises(TypeError, match = r'sample 0 item 0: modality 0 encoder must return one latent tensor per input.*got tuple'):
        model([[randn(3, 2, 2)]])


def test_frozen_encoder_with_batchnorm_keeps_its_statistics():
    encoder = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    model = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                        modality_encoder = encoder, transformer = dict(dim = 32, depth = 1))
    model.train()
    before = encoder[1].running_mean.clone()
    model([[randn(3, 2, 2) * 5 + 3]]).backward()
    assert torch.equal(encoder[1].running_mean, before)


class RunningMean(nn.Module):
    """A trainable encoder with a buffer it updates in train mode (no batch statistics in its output)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.register_buffer('seen', torch.zeros(3))

    def forward(self, x):
        if self.training:
            self.seen += x.detach().mean(dim = (0, 2, 3))
        return self.proj(x)


def encoder_model(encoder: nn.Module) -> Transfusion:
    return Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = encoder, train_modality_encoders = True, transformer = dict(dim = 32, depth = 1))


class Cast(nn.Module):
    """An encoder whose latents come out in `dtype`."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.proj, self.dtype = nn.Conv2d(3, 8, 1), dtype

    def forward(self, x):
        return self.proj(x).to(self.dtype)


@pytest.mark.parametrize('dtype', [torch.int64, torch.bool, torch.complex64])
def test_an_encoder_returning_latents_that_are_not_real_floats_is_named(dtype: torch.dtype):
    """Integer latents would fail deep in the noise draw and complex ones lose their imaginary
    part; both are refused before anything is drawn."""
    model, batch = encoder_model(Cast(dtype)), [[torch.tensor([1]), randn(3, 2, 2)]]
    before, generator = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    with pytest.raises(TypeError, match = rf'sample 0 item 1: modality 0 encoder must return real floating latents, got {dtype}'):
        model(batch)
    assert torch.equal(torch.get_rng_state(), generator)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rejected_batch_leaves_the_generators_a_trainable_encoder_drew_from_unchanged():
    """The encoders run before the text ids are checked: the dropout masks they drew are undone."""
    model = encoder_model(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Dropout(0.5)))
    image = randn(3, 2, 2)
    generator = torch.get_rng_state()
    with pytest.raises(ValueError, match = r'sample 0, item 1: text id 8 is outside'):
        model([[image, torch.tensor([8])]])
    assert torch.equal(torch.get_rng_state(), generator)
    model([[image, torch.tensor([7])]])      # an accepted batch draws as usual
    assert not torch.equal(torch.get_rng_state(), generator)


def test_rejected_batch_leaves_a_trainable_encoders_buffers_unchanged():
    model = encoder_model(RunningMean())
    model([[randn(3, 2, 2)]])
    seen = model.modalities.encoders[0].seen.clone()
    assert seen.abs().sum() > 0       # the encoder did run in train mode and update its buffer
    with pytest.raises(ValueError, match = r'sample 1, item 1: text id 9 is outside'):
        model([[randn(3, 2, 2)], [randn(3, 2, 2), torch.tensor([9])]])
    with pytest.raises(ValueError, match = r'noise for instance 0 holds non-finite values'):
        model([[randn(3, 2, 2)]], noise = [torch.full((8, 2, 2), float('inf'))])
    assert torch.equal(model.modalities.encoders[0].seen, seen)


class FirstOnly(RunningMean):
    """Updates its buffer, then returns one latent for a batch of several inputs."""

    def forward(self, x):
        return super().forward(x)[:1]


def test_encoder_dropping_part_of_its_batch_is_named_and_changes_nothing():
    """Two same-shape instances are encoded as one batch of two: an encoder that returns one
    latent is refused with a TypeError naming both items, and the buffer it updated before
    the refusal is restored (any exception, not only ValueError)."""
    model = encoder_model(FirstOnly())
    with pytest.raises(TypeError, match = r'sample 0 item 0, sample 1 item 0: modality 0 encoder must return one latent tensor '
                                          r'per input, batched like its input \(2, 3, 2, 2\); got shape \(1, 8, 2, 2\)'):
        model([[randn(3, 2, 2)], [randn(3, 2, 2)]])
    assert not model.modalities.encoders[0].seen.any()


def test_predict_runs_a_trainable_encoder_in_eval_mode():
    model = encoder_model(RunningMean())
    model.train()
    batch, times, noise = [[randn(3, 2, 2)]], torch.tensor([.3]), [randn(8, 2, 2)]
    first = model.predict(batch, times, noise).velocities[0]
    assert torch.equal(model.modalities.encoders[0].seen, torch.zeros(3)) and model.training
    assert torch.equal(model.predict(batch, times, noise).velocities[0], first)


@pytest.mark.parametrize('norm', [nn.BatchNorm2d(8), nn.SyncBatchNorm(8)])
def test_trainable_encoder_with_batch_statistics_is_refused(norm):
    with pytest.raises(ValueError, match = r'modality 0 encoder: 1 \(.*BatchNorm.*\) normalises with batch statistics.*use GroupNorm'):
        encoder_model(nn.Sequential(nn.Conv2d(3, 8, 1), norm))


def test_a_decoder_sharing_a_weight_with_a_trainable_encoder_is_refused():
    """Decoders are frozen: a tied decoder would silently freeze the encoder it shares with."""
    encoder = nn.Conv2d(3, 8, 1)
    with pytest.raises(ValueError, match = r"modality 0 decoder: weight is also modality 0 encoder's weight; decoders are frozen"):
        Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                    modality_encoder = encoder, modality_decoder = encoder, train_modality_encoders = True, transformer = dict(dim = 32, depth = 1))
    frozen = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),   # frozen encoders may share
                         modality_encoder = encoder, modality_decoder = encoder, transformer = dict(dim = 32, depth = 1))
    assert not any(p.requires_grad for p in frozen.modalities.encoders.parameters())


def test_sampling_runs_a_trainable_encoder_in_eval_mode():
    model = encoder_model(RunningMean())
    model.train()
    model.sample([randn(3, 2, 2), torch.tensor([1])], max_length = 20, modality_steps = 1, show_progress = False)
    with pytest.raises(ValueError, match = 'leaves no room'):
        model.sample([randn(3, 2, 2)], max_length = 9, show_progress = False)
    assert torch.equal(model.modalities.encoders[0].seen, torch.zeros(3)) and model.training


def test_inference_hands_every_submodule_back_in_its_own_mode():
    """A model in train mode whose encoder the caller keeps in eval (a frozen encoder with
    statistics): predict, sampling and text generation put everything in eval mode for the
    call and then restore each submodule's own mode, not the model's mode everywhere."""
    model = encoder_model(RunningMean())
    model.train()
    model.modalities.encoders[0].eval()
    model.predict([[randn(3, 2, 2)]], torch.tensor([.3]), [randn(8, 2, 2)])
    model.sample([randn(3, 2, 2), torch.tensor([1])], max_length = 20, modality_steps = 1, show_progress = False)
    model.generate_text_only(torch.tensor([[1, 2]]), 6)
    assert model.training and model.transformer.blocks[0].training
    assert not model.modalities.encoders[0].training
    model.eval()
    model.transformer.blocks[0].train()
    model.sample(max_length = 8, show_progress = False)
    assert not model.training and model.transformer.blocks[0].training

"""The configuration at its edges: keywords read into a config (one value for every modality,
a single modality's nested value, flags that must be bools), and a config through the manifest
and back, every field kept, with the fields that change what the model computes refused as
runtime overrides."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.checkpoint import load_config, load_training_state, save_training_state
from transfusion_pytorch.config import TransfusionConfig
from transfusion_pytorch.keywords import build_config

from conftest import tiny_model

SMALL = dict(dim = 32, depth = 1, heads = 2, dim_head = 16)


def test_a_single_per_modality_value_applies_to_every_modality():
    """A per-modality keyword given once, as a plain value, is every modality's value."""
    config = build_config(num_text_tokens = 8, transformer = SMALL, dim_latent = (8, 4), modality_default_shape = ((4, 2), (6,)),
                          channel_first_latent = True, add_modality_shape_tokens = False, modality_loss_weight = 0.5,
                          modality_downsample = 2, modality_unet_dim = 12)
    assert [(m.channel_first, m.shape_tokens, m.loss_weight, m.downsample, m.unet_dim) for m in config.modalities] == \
        [(True, False, 0.5, 2, 12)] * 2
    assert [m.default_shape for m in config.modalities] == [(4, 2), (6,)]


def test_one_modality_takes_its_default_shape_also_nested():
    """One value per modality also works for a single modality: ((4,),) is modality 0's (4,)."""
    nested = build_config(num_text_tokens = 8, transformer = SMALL, dim_latent = (8,), modality_default_shape = ((4,),))
    flat = build_config(num_text_tokens = 8, transformer = SMALL, dim_latent = (8,), modality_default_shape = (4,))
    assert nested == flat and nested.modalities[0].default_shape == (4,)


def test_axial_rotary_must_be_a_bool():
    """A string 'False' (from a command line or YAML) would switch axial positions on."""
    with pytest.raises(ValueError, match = r"axial_rotary must be True or False, got 'False'"):
        build_config(num_text_tokens = 8, transformer = SMALL, dim_latent = 4, modality_default_shape = (2,), axial_rotary = 'False')


def test_every_modality_field_survives_the_manifest(tmp_path):
    """The config a checkpoint gives back equals the one saved, per-modality fields included
    (a modality loss weight that came back as 1 would change the training objective)."""
    model = tiny_model(modality_loss_weight = (0.5, 2.), channel_first_latent = (True, False), add_modality_shape_tokens = (False, True),
                       transformer = SMALL)
    config = model.config
    assert TransfusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model.save_pretrained(tmp_path)
    assert load_config(tmp_path) == config
    assert [m.loss_weight for m in Transfusion.from_pretrained(tmp_path).config.modalities] == [0.5, 2.]


def test_rotary_theta_is_part_of_the_model_not_a_runtime_option(tmp_path):
    """rotary_theta changes what every attention layer computes without changing any weight
    shape: a resume into, or a from_pretrained with, another theta must be refused."""
    model = Transfusion(num_text_tokens = 8, transformer = SMALL)
    save_training_state(tmp_path / 'state', model, torch.optim.AdamW(model.parameters()), step = 0)
    model.save_pretrained(tmp_path / 'pretrained')
    other = Transfusion.from_config(replace(model.config, transformer = replace(model.config.transformer, rotary_theta = 500.)))
    with pytest.raises(ValueError, match = r'different config: transformer.rotary_theta: saved 10000.0, model 500.0'):
        load_training_state(tmp_path / 'state', other)
    with pytest.raises(ValueError, match = r"only overrides runtime options .*\['rotary_theta'\]"):
        Transfusion.from_pretrained(tmp_path / 'pretrained', rotary_theta = 500.)

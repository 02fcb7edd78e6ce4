"""Checkpoints: round trips, encoders passed again, refusals with clear errors, no arbitrary
unpickling, crash safety, training state and an exact resume in a fresh process."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn, randn

from transfusion_pytorch import Transfusion, checkpoint, checkpoint_files
from transfusion_pytorch.checkpoint import load_training_state, make_ema, save_training_state

from conftest import mixed_batch, tiny_model
from resume_worker import make_model, train, training_run

try:                                             # not a dependency; its RNG is saved when it is imported
    import numpy as np
except ImportError:
    np = None

WORKER = Path(__file__).with_name('resume_worker.py')


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def payload_path(directory: Path, name: str = 'config.json') -> Path:
    """The payload file the manifest `name` in `directory` names."""
    return directory / json.loads((directory / name).read_text())['payload']['name']


def edit_manifest(directory: Path, edit: Callable[[dict], object], name: str = 'config.json') -> None:
    """Apply `edit` to a manifest in place, as a hand edit or a foreign writer would."""
    manifest = json.loads((directory / name).read_text())
    edit(manifest)
    (directory / name).write_text(json.dumps(manifest))


def test_round_trip_gives_the_same_model(tmp_path):
    model = tiny_model(time_conditioning = 'adaptive', text_loss_weight = 0.5)
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / 'config.json').read_text())
    assert manifest['format_version'] == checkpoint.FORMAT_VERSION and manifest['config']['text_loss_weight'] == 0.5
    loaded = Transfusion.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_state(loaded, model)
    batch, times, noise = mixed_batch(), torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    a, b = model.predict(batch, times, noise), loaded.predict(batch, times, noise)
    assert all(torch.equal(x, y) for x, y in zip(a.logits + a.velocities, b.logits + b.velocities))


def test_runtime_options_may_change_at_load_but_nothing_else(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path, checkpoint_activations = True, attention_backend = 'sdpa',
                                         compile_options = {'cpp_wrapper': True})
    assert loaded.config.transformer.checkpoint_activations and loaded.config.transformer.attention_backend == 'sdpa'
    assert loaded.config.transformer.compile_options_dict == {'cpp_wrapper': True}
    loaded.save_pretrained(tmp_path / 'again')    # the options survive JSON: lists of pairs come back as pairs
    again = Transfusion.from_pretrained(tmp_path / 'again')
    assert again.config == loaded.config and hash(again.config) == hash(loaded.config)
    with pytest.raises(ValueError, match = r"only overrides runtime options .*\['dim'\]"):
        Transfusion.from_pretrained(tmp_path, dim = 128)


def image_model(encoder: nn.Module, decoder: nn.Module) -> Transfusion:
    return Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = encoder, modality_decoder = decoder, transformer = dict(dim = 32, depth = 1))


def test_encoders_are_passed_again_and_saved_only_when_asked(tmp_path):
    encoder, decoder = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
    model = image_model(encoder, decoder)
    model.save_pretrained(tmp_path / 'plain')
    assert not any('modalities.encoders' in k or 'modalities.decoders' in k
                   for k in torch.load(payload_path(tmp_path / 'plain'), weights_only = True))
    with pytest.raises(ValueError, match = 'saved with a modality_encoder for modality 0; pass it again'):
        Transfusion.from_pretrained(tmp_path / 'plain', modality_decoder = decoder)
    fresh = nn.Conv2d(3, 8, 1)
    kept = fresh.weight.clone()
    loaded = Transfusion.from_pretrained(tmp_path / 'plain', modality_encoder = fresh, modality_decoder = nn.Conv2d(8, 3, 1))
    assert loaded.modalities.encoders[0] is fresh and torch.equal(fresh.weight, kept)   # the caller's weights

    model.save_pretrained(tmp_path / 'with_coders', include_coders = True)
    fresh_encoder, fresh_decoder = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
    Transfusion.from_pretrained(tmp_path / 'with_coders', modality_encoder = fresh_encoder, modality_decoder = fresh_decoder)
    assert torch.equal(fresh_encoder.weight, encoder.weight) and torch.equal(fresh_decoder.weight, decoder.weight)


@pytest.mark.parametrize('edit, error, message', [
    (lambda m: m.update(format_version = checkpoint.FORMAT_VERSION + 1), ValueError, f'format version {checkpoint.FORMAT_VERSION + 1}, written by a newer'),
    (lambda m: m['config']['transformer'].update(dim = 48), ValueError, r'do not match the model .*token_embedding.weight: saved \(\d+, 64\), model \(\d+, 48\)'),
    (lambda m: m['config'].update(new_field = 1), ValueError, r"cannot be read by transfusion_pytorch .*unknown TransfusionConfig fields \['new_field'\]"),
    (lambda m: m['payload'].update(name = '../weights-0000000000000000.pt'), ValueError, 'invalid payload name'),
    (lambda m: m.update(format = 'something.else'), ValueError, 'is not a transfusion_pytorch.pretrained manifest'),
    (lambda m: m.update(payload = 'weights.pt'), ValueError, '"payload" must be an object with string "name" and "sha256"'),
    (lambda m: m.update(modality_encoders = 1), ValueError, '"modality_encoders" must be a list of booleans, got 1'),
    (lambda m: m['config'].pop('transformer'), ValueError, 'needs num_text_tokens \\(an int\\) and transformer \\(a dict\\)'),
])
def test_bad_checkpoints_are_refused_clearly(tmp_path, edit, error, message):
    tiny_model().save_pretrained(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(error, match = message):
        Transfusion.from_pretrained(tmp_path)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match = 'config.json is missing'):
        Transfusion.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    weights = payload_path(tmp_path)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match = 'is corrupt: its sha256 does not match'):
        Transfusion.from_pretrained(tmp_path)


class Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_weights_never_unpickle_arbitrary_objects(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    marker = tmp_path / 'code_ran'
    weights = payload_path(tmp_path)
    torch.save({'token_embedding.weight': Payload(marker)}, weights)
    edit_manifest(tmp_path, lambda m: m['payload'].update(sha256 = checkpoint_files._file_sha256(weights)))
    with pytest.raises(ValueError, match = 'refusing to unpickle'):
        Transfusion.from_pretrained(tmp_path)
    assert not marker.exists()


class Crash(Exception):
    """Stands for the process dying at that point."""


def crash_at(monkeypatch, stage: str) -> None:
    """Make the next save fail while writing the weights, renaming them, or renaming the manifest."""
    if stage == 'writing_weights':
        class Failing(checkpoint_files._HashingWriter):
            def write(self, data):
                super().write(data)
                raise Crash
        monkeypatch.setattr(checkpoint_files, '_HashingWriter', Failing)
        return
    calls, original = [], os.replace
    fail_on = 1 if stage == 'renaming_weights' else 2

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_on:
            raise Crash
        original(src, dst)
    monkeypatch.setattr(checkpoint_files.os, 'replace', replace)


@pytest.mark.parametrize('stage', ['writing_weights', 'renaming_weights', 'renaming_manifest'])
def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, stage):
    old, new = tiny_model(), tiny_model()
    old.save_pretrained(tmp_path)
    with monkeypatch.context() as patch:
        crash_at(patch, stage)
        with pytest.raises(Crash):
            new.save_pretrained(tmp_path)
    assert_same_state(Transfusion.from_pretrained(tmp_path), old)
    (tmp_path / '.tmp-transfusion-left-by-a-killed-process').write_bytes(b'partial')
    new.save_pretrained(tmp_path)
    assert_same_state(Transfusion.from_pretrained(tmp_path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', payload_path(tmp_path).name]


@pytest.mark.parametrize('decay, error, message', [(float('nan'), ValueError, r'decay must be in \[0, 1\], got nan'),
                                                     (1.5, ValueError, r'decay must be in \[0, 1\], got 1.5'),
                                                     ('0.9', TypeError, r'decay must be a number in \[0, 1\], got str')])
def test_ema_decay_outside_0_1_is_refused(decay, error, message):
    """A NaN decay passes torch's own range check and would fill the average with NaN."""
    with pytest.raises(error, match = message):
        make_ema(torch.nn.Linear(2, 2), decay = decay)


@pytest.mark.parametrize('decay, moved', [(0.9, 0.1), (None, 0.001), (1., 0.)], ids = ['decay_0.9', 'default_0.999', 'decay_1'])
def test_ema_helper_averages_exponentially(decay, moved):
    """Each update moves the average by 1 - decay of the step; decay 1 (allowed: [0, 1]) keeps the first copy."""
    model = tiny_model()
    ema = make_ema(model) if decay is None else make_ema(model, decay = decay)
    ema.update_parameters(model)                     # the first update copies
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
    ema.update_parameters(model)
    for averaged, old in zip(ema.module.parameters(), before):
        torch.testing.assert_close(averaged, old + moved, rtol = 0, atol = 1e-5)


def test_training_state_restores_everything_and_rng(tmp_path):
    run = training_run(make_model())
    train(run, 0, 2)
    save_training_state(tmp_path, run.model, run.optimizer, step = 2, ema = run.ema, extra = {'epoch': 3})
    draws = lambda: (torch.rand(3), random.random(), None if np is None else np.random.rand())
    expected = draws()
    other = training_run(make_model())
    state = load_training_state(tmp_path, other.model, other.optimizer, ema = other.ema)
    after = draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert (state.step, state.extra) == (2, {'epoch': 3})
    assert_same_state(other.model, run.model)
    assert_same_state(other.ema, run.ema)
    saved, restored = run.optimizer.state_dict()['state'], other.optimizer.state_dict()['state']
    assert all(torch.equal(saved[i]['exp_avg'], restored[i]['exp_avg']) for i in saved)


def test_training_state_needs_the_same_config_up_to_runtime_options(tmp_path):
    run = training_run(make_model())
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    config = run.model.config
    checkpointed = Transfusion.from_config(replace(config, transformer = replace(config.transformer, checkpoint_activations = True)))
    load_training_state(tmp_path, checkpointed)
    assert_same_state(checkpointed, run.model)
    wider = Transfusion(num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2, 3), (3,)),
                        transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 16))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match = r'different config: .*transformer.dim: saved 32, model 64'):
        load_training_state(tmp_path, wider)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_resume_in_a_fresh_process_continues_exactly(tmp_path):
    """N steps, save, then M more in a new Python process == N + M steps straight."""
    n, m = 3, 3
    torch.manual_seed(0)
    straight = training_run(make_model())
    expected = train(straight, 0, n + m)
    torch.manual_seed(0)
    first = training_run(make_model())
    assert train(first, 0, n) == expected[:n]
    save_training_state(tmp_path / 'state', first.model, first.optimizer, step = n, ema = first.ema, scheduler = first.scheduler)
    command = [sys.executable, str(WORKER), str(tmp_path / 'state'), str(n + m), str(torch.get_num_threads()), str(tmp_path / 'out')]
    result = subprocess.run(command, capture_output = True, text = True, timeout = 120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'out' / 'losses.json').read_text()) == expected[n:]
    assert_same_state(Transfusion.from_pretrained(tmp_path / 'out' / 'ema'), straight.ema.module)


def test_extra_that_could_not_be_loaded_is_refused_before_anything_is_written(tmp_path):
    """weights_only loading refuses non-plain objects: saving one would replace a good
    checkpoint with one that cannot be read."""
    run = training_run(make_model())
    save_training_state(tmp_path, run.model, run.optimizer, step = 1, extra = {'epoch': 1})
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad, named in ((Path('data'), r"extra\['path'\]: pathlib.*PosixPath|extra\['path'\]: pathlib"),
                       (np.float64(0.5) if np is not None else object(), r"extra\['path'\]"),
                       ([1, {'deep': object()}], r"extra\['path'\]\[1\]\['deep'\]: builtins.object")):
        with pytest.raises(TypeError, match = named):
            save_training_state(tmp_path, run.model, run.optimizer, step = 2, extra = {'path': bad})
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_training_state(tmp_path, run.model, run.optimizer).extra == {'epoch': 1}


def test_training_state_refuses_other_optimizers_schedulers_and_missing_coders(tmp_path):
    run = training_run(make_model())
    scheduler = torch.optim.lr_scheduler.LinearLR(run.optimizer)
    save_training_state(tmp_path, run.model, run.optimizer, step = 1, scheduler = scheduler)
    other = training_run(make_model())
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(other.optimizer, 10)
    with pytest.raises(ValueError, match = 'saved with a LinearLR scheduler, got a CosineAnnealingLR'):
        load_training_state(tmp_path, other.model, other.optimizer, scheduler = cosine)
    with pytest.raises(ValueError, match = 'saved with a AdamW optimizer, got a SGD'):
        load_training_state(tmp_path, other.model, torch.optim.SGD(other.model.parameters(), lr = 0.1))
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())

    encoded = Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                          modality_encoder = nn.Conv2d(3, 8, 1), transformer = dict(dim = 32, depth = 1))
    optimizer = torch.optim.AdamW(encoded.parameters())
    save_training_state(tmp_path / 'coders', encoded, optimizer, step = 0)
    bare = Transfusion.from_config(encoded.config)
    with pytest.raises(ValueError, match = 'saved with a modality_encoder for modality 0'):
        load_training_state(tmp_path / 'coders', bare, torch.optim.AdamW(bare.parameters()))


def test_a_training_manifest_without_a_step_is_refused_before_loading(tmp_path):
    run = training_run(make_model())
    save_training_state(tmp_path, run.model, run.optimizer, step = 1)
    manifest = tmp_path / checkpoint.TRAINING_MANIFEST
    data = json.loads(manifest.read_text())
    del data['step']
    manifest.write_text(json.dumps(data))
    other = training_run(make_model())
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match = '"step" must be a non-negative integer, got None'):
        load_training_state(tmp_path, other.model, other.optimizer)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_a_bf16_model_comes_back_in_bf16_unless_asked_otherwise(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded, model)
    widened = Transfusion.from_pretrained(tmp_path, dtype = torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    assert all(torch.equal(widened.state_dict()[k], v.float()) for k, v in model.state_dict().items())
    edit_manifest(tmp_path, lambda m: m.update(dtype = 'int8'))
    with pytest.raises(ValueError, match = '"dtype" must name a floating torch dtype'):
        Transfusion.from_pretrained(tmp_path)


def test_a_missing_decoder_is_refused_like_a_missing_encoder(tmp_path):
    image_model(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match = 'saved with a modality_decoder for modality 0; pass it again'):
        Transfusion.from_pretrained(tmp_path, modality_encoder = nn.Conv2d(3, 8, 1))


def test_a_trained_encoder_resumes_with_its_training_state(tmp_path):
    """With train_modality_encoders the encoder is part of what is trained, so a training state
    holds it by default: a fresh encoder passed at resume takes the trained weights."""
    def build():
        torch.manual_seed(0)   # the same initial weights for both models
        return Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                           modality_encoder = nn.Conv2d(3, 8, 1), modality_decoder = nn.Conv2d(8, 3, 1),
                           train_modality_encoders = True, transformer = dict(dim = 32, depth = 1))
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 0.1)
    model([[torch.randint(0, 8, (3,)), randn(3, 2, 2)]]).backward()
    optimizer.step()
    save_training_state(tmp_path, model, optimizer, step = 1)
    resumed = build()
    assert not torch.equal(resumed.modalities.encoders[0].weight, model.modalities.encoders[0].weight)
    load_training_state(tmp_path, resumed, torch.optim.AdamW(resumed.parameters(), lr = 0.1))
    assert torch.equal(resumed.modalities.encoders[0].weight, model.modalities.encoders[0].weight)


def test_a_state_without_ema_or_scheduler_is_refused_before_anything_changes(tmp_path):
    run = training_run(make_model())
    train(run, 0, 1)
    save_training_state(tmp_path, run.model, run.optimizer, step = 1)
    other = training_run(make_model())
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    optimizer_before = other.optimizer.state_dict()
    with pytest.raises(ValueError, match = 'the training state was saved without an EMA'):
        load_training_state(tmp_path, other.model, other.optimizer, ema = other.ema)
    with pytest.raises(ValueError, match = 'the training state was saved without a scheduler'):
        load_training_state(tmp_path, other.model, other.optimizer, scheduler = torch.optim.lr_scheduler.LinearLR(other.optimizer))
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert other.optimizer.state_dict()['state'] == optimizer_before['state']


def test_weights_and_a_training_state_share_a_directory(tmp_path):
    """Each save prunes payloads no manifest names, counting both kinds of manifest: saving one
    kind again keeps the other loadable."""
    run = training_run(make_model())
    run.model.save_pretrained(tmp_path)
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    train(run, 0, 1)
    run.model.save_pretrained(tmp_path)
    save_training_state(tmp_path, run.model, run.optimizer, step = 1)
    assert_same_state(Transfusion.from_pretrained(tmp_path), run.model)
    resumed = training_run(make_model())
    assert load_training_state(tmp_path, resumed.model, resumed.optimizer).step == 1
    assert_same_state(resumed.model, run.model)
    assert len(list(tmp_path.glob('*.pt'))) == 2


def test_an_optimizer_that_also_holds_other_parameters_saves_and_loads(tmp_path):
    """Only an optimizer holding none of the model's parameters is refused: one that also
    trains a parameter outside the model (a learned loss scale, say) saves and resumes."""
    torch.manual_seed(0)
    model, scale = Transfusion(num_text_tokens = 8, transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16)), nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([*model.parameters(), scale], lr = 0.25)
    save_training_state(tmp_path, model, optimizer, step = 4)
    torch.manual_seed(1)
    other = Transfusion(num_text_tokens = 8, transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    other_optimizer = torch.optim.AdamW([*other.parameters(), nn.Parameter(torch.ones(3))], lr = 1.)
    assert load_training_state(tmp_path, other, other_optimizer).step == 4
    assert other_optimizer.param_groups[0]['lr'] == 0.25
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

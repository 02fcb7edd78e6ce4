"""Rules of pretrained checkpoints and of checkpoint files that a mutation review found no test
holding: each test here fails when one of those rules is broken."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion, checkpoint_files
from transfusion_pytorch.checkpoint import (TRAINING_MANIFEST, load_config, load_training_state, make_ema, save_pretrained,
                                            save_training_state)

from conftest import tiny_model
from test_checkpoint import Crash, edit_manifest, payload_path
from resume_worker import make_model, training_run


def state_of(module: nn.Module) -> dict:
    """A detached copy of a module's state dict, to compare against later."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: nn.Module, state: dict) -> bool:
    """Whether `module` holds exactly `state`: the same keys, bitwise-equal tensors."""
    current = module.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], v) for k, v in state.items())


def coder_model(seed: int, train_encoders: bool = False) -> Transfusion:
    """A one-modality image model with a 1x1 conv encoder and decoder, initialised from `seed`."""
    torch.manual_seed(seed)
    return Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = nn.Conv2d(3, 8, 1), modality_decoder = nn.Conv2d(8, 3, 1),
                       train_modality_encoders = train_encoders, transformer = dict(dim = 32, depth = 1))


# pretrained manifests and payloads

@pytest.mark.parametrize('edit, message', [
    # a field this version does not know inside the transformer config (TypeError from the dataclass)
    (lambda m: m['config']['transformer'].update(dimm = 1), r"cannot be read by transfusion_pytorch .*dimm"),
    # weights a deeper or shallower model would have: missing or left over, never loaded partly
    (lambda m: m['config']['transformer'].update(depth = 3), r"missing \['transformer\.blocks\.2\."),
    (lambda m: m['config']['transformer'].update(depth = 1), r"unexpected \['transformer\.blocks\.1\."),
    (lambda m: m.update(format_version = 0), r'no valid format_version \(got 0\)'),
    (lambda m: m.update(modality_encoders = ['no', False]), r'"modality_encoders" must be a list of booleans'),
    (lambda m: m['payload'].pop('sha256'), r'"payload" must be an object with string "name" and "sha256"'),
], ids = ['unknown_transformer_field', 'deeper', 'shallower', 'format_version_0', 'non_bool_flags', 'no_sha256'])
def test_bad_pretrained_manifests_are_refused_with_the_reason(tmp_path: Path, edit, message: str):
    tiny_model().save_pretrained(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(ValueError, match = message):
        Transfusion.from_pretrained(tmp_path)


def test_a_missing_payload_is_named(tmp_path: Path):
    tiny_model().save_pretrained(tmp_path)
    payload_path(tmp_path).unlink()
    with pytest.raises(FileNotFoundError, match = r'payload weights-[0-9a-f]{16}\.pt is missing'):
        Transfusion.from_pretrained(tmp_path)


def test_map_location_reads_every_tensor(tmp_path: Path):
    """map_location is torch.load's: a callable one sees every stored tensor."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    seen = []
    loaded = Transfusion.from_pretrained(tmp_path, map_location = lambda storage, location: (seen.append(location), storage)[1])
    assert len(seen) == len(model.state_dict()) and same_state(loaded, state_of(model))


@pytest.mark.gpu
def test_a_device_map_location_places_the_model_there(tmp_path: Path):
    """Not seen failing here (no GPU): on CPU the model is built where the weights are read."""
    tiny_model().save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path, map_location = 'cuda')
    assert {p.device.type for p in loaded.parameters()} == {'cuda'}


def test_load_config_prefers_the_pretrained_manifest(tmp_path: Path):
    """Both kinds may share a directory; the module doc promises the pretrained config first."""
    pretrained, run = tiny_model(), training_run(make_model())
    pretrained.save_pretrained(tmp_path)
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    assert pretrained.config != run.model.config and load_config(tmp_path) == pretrained.config


def test_train_modality_encoders_comes_back_as_saved_unless_overridden(tmp_path: Path):
    coder_model(0, train_encoders = True).save_pretrained(tmp_path)
    coders = lambda: dict(modality_encoder = nn.Conv2d(3, 8, 1), modality_decoder = nn.Conv2d(8, 3, 1))
    assert Transfusion.from_pretrained(tmp_path, **coders()).modalities.train_encoders is True
    assert Transfusion.from_pretrained(tmp_path, train_modality_encoders = False, **coders()).modalities.train_encoders is False


def test_a_mixed_precision_model_loads_without_rounding_any_weight(tmp_path: Path):
    """With parameters in several dtypes there is no single saved dtype to restore: the model
    comes back in fp32, which holds bf16 and fp16 values exactly. Converting all to either half
    dtype would round the other's values (a bf16 1e6 overflows fp16; fp16's 1 + 2**-10 has no bf16)."""
    model = tiny_model().to(torch.float16)
    model.to_logits.to(torch.bfloat16)
    with torch.no_grad():
        model.to_logits.weight[0, 0] = 1e6
        model.token_embedding.weight[0, 0] = 1 + 2 ** -10
    model.save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path)
    saved = model.state_dict()
    assert all(torch.equal(v.float(), saved[k].float()) for k, v in loaded.state_dict().items())


def test_a_compiled_model_saves_and_averages_like_the_plain_one(tmp_path: Path):
    """torch.compile's wrapper prefixes every state key with `_orig_mod.`; checkpoints and the
    EMA helper see through it."""
    model = make_model()
    compiled = torch.compile(model)           # lazy: nothing is compiled unless it runs
    save_pretrained(compiled, tmp_path / 'weights')   # not compiled.save_pretrained: that binds the inner model
    assert same_state(Transfusion.from_pretrained(tmp_path / 'weights'), state_of(model))

    ema = make_ema(compiled, decay = 0.9)
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path / 'state', compiled, optimizer, step = 0, ema = ema)
    plain = training_run(make_model())
    load_training_state(tmp_path / 'state', plain.model, plain.optimizer, ema = plain.ema)
    assert same_state(plain.ema, state_of(ema))


# files

def test_checkpoint_files_are_readable_by_others(tmp_path: Path):
    """The temporary file mkstemp makes is owner-only; a shared checkpoint must not stay so."""
    run = training_run(make_model())
    run.model.save_pretrained(tmp_path)
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o644}, modes


def test_a_failed_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    class Failing(checkpoint_files._HashingWriter):
        def write(self, data):
            super().write(data)
            raise Crash
    monkeypatch.setattr(checkpoint_files, '_HashingWriter', Failing)
    with pytest.raises(Crash):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_saving_creates_missing_parent_directories(tmp_path: Path):
    model = tiny_model()
    model.save_pretrained(tmp_path / 'runs' / 'a' / 'final')
    assert same_state(Transfusion.from_pretrained(tmp_path / 'runs' / 'a' / 'final'), state_of(model))


def test_pruning_removes_only_what_it_knows_to_be_stale(tmp_path: Path):
    """Files that merely start like a payload name are the user's. A manifest that cannot be
    read may still name its payload: keep it."""
    run = training_run(make_model())
    user_files = ['weights-0123456789abcdef.pt.bak', 'notes.txt']
    for name in user_files:
        (tmp_path / name).write_bytes(b'mine')
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    run.model.save_pretrained(tmp_path)
    assert all((tmp_path / name).exists() for name in user_files)
    state = payload_path(tmp_path, TRAINING_MANIFEST)
    (tmp_path / TRAINING_MANIFEST).write_text('{"payload": ')        # a half-written or hand-broken manifest
    run.model.save_pretrained(tmp_path)
    assert state.exists()

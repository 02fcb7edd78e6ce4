"""Rules of checkpoints, RNG states, the autocast weight copies and host-device transfers that a
mutation review found no test holding: each test here fails when one of those rules is broken."""
from __future__ import annotations

import collections
import enum
import json
import stat
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn, randint

from transfusion_pytorch import Transfusion, autocast_weights, checkpoint_files
from transfusion_pytorch.checkpoint import (TRAINING_MANIFEST, load_config, load_training_state, make_ema, save_pretrained,
                                            save_training_state)
from transfusion_pytorch.transfer import cat_on_device, host_to_device

from conftest import mixed_batch, tiny_model
from resume_worker import make_model, train, training_run

BF16 = dict(device_type = 'cpu', dtype = torch.bfloat16)


def state_of(module: nn.Module) -> dict:
    """A detached copy of a module's state dict, to compare against later."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: nn.Module, state: dict) -> bool:
    """Whether `module` holds exactly `state`: the same keys, bitwise-equal tensors."""
    current = module.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], v) for k, v in state.items())


def edit_manifest(directory: Path, edit: Callable[[dict], object], name: str = 'config.json') -> None:
    """Apply `edit` to a manifest in place, as a hand edit or a foreign writer would."""
    manifest = json.loads((directory / name).read_text())
    edit(manifest)
    (directory / name).write_text(json.dumps(manifest))


def payload_path(directory: Path, name: str = 'config.json') -> Path:
    """The payload file the manifest `name` in `directory` names."""
    return directory / json.loads((directory / name).read_text())['payload']['name']


def rewrite_payload(directory: Path, name: str, edit: Callable[[dict], object]) -> None:
    """Change a payload and record its new hash, so that only the edit, not corruption, is seen."""
    path = payload_path(directory, name)
    payload = torch.load(path, weights_only = True)
    edit(payload)
    torch.save(payload, path)
    edit_manifest(directory, lambda m: m['payload'].update(sha256 = checkpoint_files._file_sha256(path)), name)


def coder_model(seed: int, train_encoders: bool = False) -> Transfusion:
    """A one-modality image model with a 1x1 conv encoder and decoder, initialised from `seed`."""
    torch.manual_seed(seed)
    return Transfusion(num_text_tokens = 8, dim_latent = 8, channel_first_latent = True, modality_default_shape = (2, 2),
                       modality_encoder = nn.Conv2d(3, 8, 1), modality_decoder = nn.Conv2d(8, 3, 1),
                       train_modality_encoders = train_encoders, transformer = dict(dim = 32, depth = 1))


def is_coder_key(key: str) -> bool:
    """Whether a state key belongs to a user's encoder or decoder (also under an EMA's `module.`)."""
    return 'modalities.encoders.' in key or 'modalities.decoders.' in key


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


# training states

def test_extra_keys_must_be_strings_or_ints_and_none_round_trips(tmp_path: Path):
    run = training_run(make_model())
    extra = {'best': None, 'history': [1.5, None], 7: 'seven'}
    save_training_state(tmp_path, run.model, run.optimizer, step = 1, extra = extra)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TypeError, match = r"extra\['runs'\]: keys must be strings or ints, got PosixPath"):
        save_training_state(tmp_path, run.model, run.optimizer, step = 2, extra = {'runs': {Path('a'): 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_training_state(tmp_path, run.model, run.optimizer).extra == extra


class Mode(str, enum.Enum):
    """A str subclass: pickled as its class, which weights_only loading refuses."""
    TRAIN = 'train'


Point = collections.namedtuple('Point', 'x y')


@pytest.mark.parametrize('value, named', [
    (Point(1, 2), r"extra\['v'\]: .*Point cannot be loaded back safely"),
    (collections.defaultdict(list, a = [1]), r"extra\['v'\]: collections.defaultdict cannot be loaded back safely"),
    ({Mode.TRAIN: 1}, r"extra\['v'\]: keys must be strings or ints, got Mode"),
], ids = ['namedtuple', 'defaultdict', 'enum_key'])
def test_subclasses_of_plain_containers_and_keys_are_refused_before_anything_is_written(tmp_path: Path, value, named: str):
    """They pass an isinstance check but pickle as their own class: saved, they would replace a
    good checkpoint with one that weights_only loading refuses."""
    run = training_run(make_model())
    save_training_state(tmp_path, run.model, run.optimizer, step = 1)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TypeError, match = named):
        save_training_state(tmp_path, run.model, run.optimizer, step = 2, extra = {'v': value})
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_training_state(tmp_path, run.model, run.optimizer).step == 1


class Warmup:
    """A learning-rate factor as a callable object: LambdaLR saves its __dict__."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return float(min(1., (step + 1) / self.steps))


@pytest.mark.parametrize('make, named', [
    (lambda model: (torch.optim.AdamW(model.parameters(), lr = np.float64(3e-4)), None),
     r"the optimizer's state_dict\(\)\['param_groups'\]\[0\]\['lr'\]: numpy.float64 cannot be loaded back safely"),
    (lambda model: (optimizer := torch.optim.AdamW(model.parameters()), torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(np.int64(10)))),
     r"the scheduler's state_dict\(\)\['lr_lambdas'\]\[0\]\['steps'\]: numpy.int64 cannot be loaded back safely"),
], ids = ['numpy_lr', 'numpy_in_a_scheduler'])
def test_optimizer_and_scheduler_states_that_could_not_be_loaded_are_refused_before_writing(tmp_path: Path, make, named: str):
    """Written, they would have replaced a good checkpoint with one that weights_only loading
    refuses."""
    model = make_model()
    good = training_run(model)
    save_training_state(tmp_path, model, good.optimizer, step = 1)
    optimizer, scheduler = make(model)
    with pytest.raises(TypeError, match = named):
        save_training_state(tmp_path, model, optimizer, step = 2, scheduler = scheduler)
    assert load_training_state(tmp_path, model, good.optimizer).step == 1


def test_an_optimizer_of_another_model_is_refused_on_saving_and_loading(tmp_path: Path):
    """The common slip: the model rebuilt from load_config after its optimizer was built; the
    optimizer would then train (and save) the old model's parameters."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, model, optimizer, step = 1)
    rebuilt = Transfusion.from_config(load_config(tmp_path))
    message = r"the optimizer holds none of the model's parameters"
    with pytest.raises(ValueError, match = message):
        load_training_state(tmp_path, rebuilt, optimizer)
    with pytest.raises(ValueError, match = message):
        save_training_state(tmp_path, rebuilt, optimizer, step = 2)


def test_the_containers_weights_only_loading_rebuilds_are_kept(tmp_path: Path):
    """OrderedDict (any state_dict()) and Counter load back as themselves."""
    run = training_run(make_model())
    extra = {'teacher': collections.OrderedDict(w = torch.ones(2)), 'seen': collections.Counter('aab'), True: (1, [2.5])}
    save_training_state(tmp_path, run.model, run.optimizer, step = 0, extra = extra)
    loaded = load_training_state(tmp_path, run.model, run.optimizer).extra
    assert type(loaded['teacher']) is collections.OrderedDict and torch.equal(loaded['teacher']['w'], torch.ones(2))
    assert type(loaded['seen']) is collections.Counter and loaded['seen'] == extra['seen'] and loaded[True] == (1, [2.5])


def test_a_bool_step_is_refused_on_saving(tmp_path: Path):
    run = training_run(make_model())
    with pytest.raises(ValueError, match = 'step must be a non-negative int, got True'):
        save_training_state(tmp_path, run.model, run.optimizer, step = True)
    assert not tmp_path.joinpath(TRAINING_MANIFEST).exists()


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.update(step = -1), r'"step" must be a non-negative integer, got -1'),
    (lambda m: m.update(step = True), r'"step" must be a non-negative integer, got True'),
    (lambda m: m.update(optimizer_class = 5), r'"optimizer_class" must be a string, got 5'),
    (lambda m: m.update(coder_weights = True), r'missing \[.*modalities\.encoders\.0\.weight'),
], ids = ['negative_step', 'bool_step', 'optimizer_class_not_str', 'coder_weights_not_saved'])
def test_bad_training_manifests_are_refused_before_anything_changes(tmp_path: Path, edit, message: str):
    model = coder_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, model, optimizer, step = 1)
    edit_manifest(tmp_path, edit, TRAINING_MANIFEST)
    other = coder_model(1)
    before = state_of(other)
    with pytest.raises(ValueError, match = message):
        load_training_state(tmp_path, other, torch.optim.AdamW(other.parameters()))
    assert same_state(other, before)


@pytest.mark.parametrize('part', ['model', 'ema'])
def test_a_payload_missing_a_weight_is_refused_before_anything_changes(tmp_path: Path, part: str):
    """Same config, fewer weights (say, from a version without some buffer): refused, not loaded
    with the missing entries left at their initial values."""
    run = training_run(make_model())
    train(run, 0, 1)
    save_training_state(tmp_path, run.model, run.optimizer, step = 1, ema = run.ema)
    key = next(k for k in run.model.state_dict() if 'to_logits' in k)
    rewrite_payload(tmp_path, TRAINING_MANIFEST, lambda p: p[part].pop(key if part == 'model' else f'module.{key}'))
    other = training_run(make_model())
    model_before, ema_before = state_of(other.model), state_of(other.ema)
    with pytest.raises(ValueError, match = r"do not match the model .*missing \[.*to_logits"):
        load_training_state(tmp_path, other.model, other.optimizer, ema = other.ema)
    assert same_state(other.model, model_before) and same_state(other.ema, ema_before)
    assert other.optimizer.state_dict()['state'] == {}


def test_untrained_coders_stay_the_callers_in_model_and_ema(tmp_path: Path):
    """Encoders/decoders that are not trained are not in a training state (neither the model's
    nor the EMA's copy): a resume keeps the modules passed and restores everything else."""
    model = coder_model(0)
    ema = make_ema(model)
    save_training_state(tmp_path, model, torch.optim.AdamW(model.parameters()), step = 0, ema = ema)
    payload = torch.load(payload_path(tmp_path, TRAINING_MANIFEST), weights_only = True)
    assert not any(is_coder_key(k) for part in ('model', 'ema') for k in payload[part])

    resumed = coder_model(1)
    resumed_ema = make_ema(resumed)
    callers = {k: v for k, v in state_of(resumed).items() if is_coder_key(k)}
    ema_callers = {k: v for k, v in state_of(resumed_ema).items() if is_coder_key(k)}
    load_training_state(tmp_path, resumed, torch.optim.AdamW(resumed.parameters()), ema = resumed_ema)
    expected = {**state_of(model), **callers}
    expected_ema = {**state_of(ema), **ema_callers}
    assert not torch.equal(callers['modalities.encoders.0.weight'], model.state_dict()['modalities.encoders.0.weight'])
    assert same_state(resumed, expected) and same_state(resumed_ema, expected_ema)


def test_save_pretrained_keeps_trained_encoders_by_default(tmp_path: Path):
    """A trained encoder is part of the model: left out, from_pretrained would give back the
    caller's fresh encoder and a different model. Frozen coders stay out by default."""
    model = coder_model(0, train_encoders = True)
    model.save_pretrained(tmp_path / 'trained')
    resumed = Transfusion.from_pretrained(tmp_path / 'trained', modality_encoder = nn.Conv2d(3, 8, 1), modality_decoder = nn.Conv2d(8, 3, 1))
    assert same_state(resumed, state_of(model))
    coder_model(0).save_pretrained(tmp_path / 'frozen')
    assert not any(is_coder_key(k) for k in torch.load(payload_path(tmp_path / 'frozen'), weights_only = True))


def test_include_coders_false_leaves_trained_coders_out(tmp_path: Path):
    model = coder_model(0, train_encoders = True)
    save_training_state(tmp_path, model, torch.optim.AdamW(model.parameters()), step = 0, include_coders = False)
    resumed = coder_model(1, train_encoders = True)
    callers = resumed.modalities.encoders[0].weight.detach().clone()
    load_training_state(tmp_path, resumed, torch.optim.AdamW(resumed.parameters()))
    assert torch.equal(resumed.modalities.encoders[0].weight, callers)
    assert torch.equal(resumed.to_logits.weight, model.to_logits.weight)


def test_numpy_cached_gaussian_is_restored(tmp_path: Path):
    """NumPy's legacy generator draws normals in pairs and keeps the second: without it the
    resumed run's next normal differs."""
    np = pytest.importorskip('numpy')            # not a dependency; its RNG is saved when it is imported
    run = training_run(make_model())
    np.random.seed(0)
    np.random.standard_normal()                  # leaves one normal cached
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    expected = [np.random.standard_normal() for _ in range(3)]
    load_training_state(tmp_path, run.model, run.optimizer)
    assert [np.random.standard_normal() for _ in range(3)] == expected


# files

def test_checkpoint_files_are_readable_by_others(tmp_path: Path):
    """The temporary file mkstemp makes is owner-only; a shared checkpoint must not stay so."""
    run = training_run(make_model())
    run.model.save_pretrained(tmp_path)
    save_training_state(tmp_path, run.model, run.optimizer, step = 0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o644}, modes


class Crash(Exception):
    """Stands for an error raised while the payload is written (disk full, a signal)."""


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


# autocast weight copies

def randomized(model: Transfusion) -> Transfusion:
    """Every weight non-zero, so a wrong or stale copy shows in the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std = 0.2)
    return model


def test_with_gradients_the_weights_are_not_swapped():
    """A copy would cut the graph: under autocast with gradients the fp32 weights get them."""
    model = tiny_model()
    with torch.autocast(**BF16), autocast_weights.weights_cast_once(model):
        assert model.to_logits.weight.dtype == torch.float32
        loss = model(mixed_batch())
    loss.backward()
    assert model.to_logits.weight.grad is not None and model.to_logits.weight.grad.abs().sum() > 0


def test_a_double_model_is_left_alone(monkeypatch):
    """Autocast does not cast float64: neither may the copies, so fp64 outputs stay fp64's."""
    model = randomized(tiny_model()).double()
    prompt = randint(0, 16, (1, 2))
    run = lambda: model.generate_text_only(prompt, 12, temperature = 0., cache_kv = False)
    with torch.autocast(**BF16):
        cast_once = run()
    monkeypatch.setattr(autocast_weights, 'autocast_dtype', lambda model: None)
    with torch.autocast(**BF16):
        every_step = run()
    assert torch.equal(cast_once, every_step)


def test_kept_copies_are_reused_refreshed_and_skipped_once_no_longer_fp32():
    """`kept` serves the same tensors on every call (compiled code and CUDA graphs read them at
    their addresses), each time with the current weights; a parameter that is no longer plain
    fp32 (the model turned to float64) is used as it is."""
    model = randomized(tiny_model())
    kept: dict = {}
    seen = []
    param = model.to_logits.weight
    with torch.no_grad(), torch.autocast(**BF16):
        for _ in range(2):
            with autocast_weights.weights_cast_once(model, kept):
                seen.append(model.to_logits.weight)
                assert torch.equal(seen[-1], param.to(torch.bfloat16))
            param.add_(1.)
        assert seen[0] is seen[1] and seen[0].dtype == torch.bfloat16
        model.double()
        with autocast_weights.weights_cast_once(model, kept):
            assert model.to_logits.weight is param and param.dtype == torch.float64


def test_copies_kept_in_inference_mode_serve_later_calls():
    model = randomized(tiny_model())
    prompt = randint(0, 16, (1, 2))
    run = lambda: model.generate_text_only(prompt, 12, temperature = 0., cache_kv = True)
    with torch.autocast(**BF16):
        with torch.inference_mode():
            first = run()
        assert torch.equal(run(), first)


# transfers

def test_host_to_device_returns_a_copy_also_on_the_same_device():
    tensor = torch.arange(3.)
    moved = host_to_device(tensor, torch.device('cpu'))
    moved.add_(1.)
    assert torch.equal(tensor, torch.arange(3.))


def test_cat_on_device_moves_what_is_elsewhere():
    """The meta device stands for a GPU: tensors already there and host tensors in one result."""
    joined = cat_on_device([torch.zeros(2, device = 'meta'), torch.arange(3.)], torch.device('meta'))
    assert joined.device.type == 'meta' and joined.shape == (5,)


@pytest.mark.gpu
def test_cat_on_device_keeps_the_order_across_devices():
    """Not seen failing here (no GPU): host tensors are moved in place, not gathered at the end."""
    a, b, c = torch.arange(2.), torch.arange(2., 5.), torch.arange(5., 6.)
    joined = cat_on_device([a.cuda(), b, c.cuda()], torch.device('cuda'))
    assert torch.equal(joined.cpu(), torch.arange(6.))

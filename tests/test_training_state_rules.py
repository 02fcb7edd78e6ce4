"""Rules of training states that a mutation review found no test holding: refusals before anything is written or changed, extras, coders, RNG states."""
from __future__ import annotations

import collections
import enum
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion, checkpoint_files
from transfusion_pytorch.checkpoint import TRAINING_MANIFEST, load_config, load_training_state, make_ema, save_training_state

from resume_worker import make_model, train, training_run
from test_checkpoint import edit_manifest, payload_path
from test_checkpoint_rules import coder_model, same_state, state_of


def rewrite_payload(directory: Path, name: str, edit: Callable[[dict], object]) -> None:
    """Change a payload and record its new hash, so that only the edit, not corruption, is seen."""
    path = payload_path(directory, name)
    payload = torch.load(path, weights_only = True)
    edit(payload)
    torch.save(payload, path)
    edit_manifest(directory, lambda m: m['payload'].update(sha256 = checkpoint_files._file_sha256(path)), name)


def is_coder_key(key: str) -> bool:
    """Whether a state key belongs to a user's encoder or decoder (also under an EMA's `module.`)."""
    return 'modalities.encoders.' in key or 'modalities.decoders.' in key


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

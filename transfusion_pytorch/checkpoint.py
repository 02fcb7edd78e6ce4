"""Checkpoints that survive crashes and never unpickle arbitrary objects.

A checkpoint is a directory with a JSON manifest and the payload file it names (both kinds may
share a directory):
- a pretrained model (`save_pretrained`/`load_pretrained`, or the Transfusion methods):
  `config.json` (format version, library version, config, which modalities had an
  encoder/decoder) and `weights-<hash>.pt`, a plain state dict;
- a training state (`save_training_state`/`load_training_state`): `training_state.json` (format
  version, config, step) and `state-<hash>.pt`: model, optimizer, EMA and scheduler state dicts,
  RNG states and the caller's extras.

The files are written and read by checkpoint_files.py: atomically (a crash leaves the previous
checkpoint or the new one, whole), hashed, and loaded with torch.load(weights_only=True), so
loading runs no code. Everything a load needs is checked before anything is changed.

Encoders/decoders (user modules the config does not describe) are passed again at load time;
their weights are saved with include_coders=True, by default when the encoders are trained
(train_modality_encoders), and are then loaded into the modules passed. DDP, AveragedModel and torch.compile
wrappers are unwrapped. Under torch.distributed with several ranks, saving and loading a training
state are collective (distributed_state.py): every rank's RNG state is kept and restored, and an
FSDP2-sharded model and optimizer are gathered for saving and scattered on loading.
`save_pretrained` writes from the calling process: call it on rank 0, with an unsharded model.
"""
from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.serialization import MAP_LOCATION

from .checkpoint_files import FORMAT_VERSION, PRETRAINED_MANIFEST, TRAINING_MANIFEST, read_manifest, read_payload, save_checkpoint
from .config import TransfusionConfig
from .rng import rng_state
from .sampling_options import is_real_number
from .distributed_state import full_states, gathered, is_sharded, load_full_states, on_rank_zero, own_rank_entry, restore_rng_state
from .version import __version__

_CODER_PREFIXES = ('modalities.encoders.', 'modalities.decoders.')
# transformer options that change how the network runs, not what it computes
RUNTIME_OPTIONS = ('attention_backend', 'compile_blocks', 'compile_stack', 'compile_options', 'checkpoint_activations', 'ff_pad_multiple')


def _config_from_manifest(manifest: dict, where: str) -> TransfusionConfig:
    try:
        return TransfusionConfig.from_dict(manifest['config'])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f'{where}: the saved config cannot be read by transfusion_pytorch {__version__}: {error}') from error


def load_config(directory: str | os.PathLike) -> TransfusionConfig:
    """The TransfusionConfig of a pretrained checkpoint or, failing that, of a training state."""
    name = PRETRAINED_MANIFEST if (Path(directory) / PRETRAINED_MANIFEST).exists() else TRAINING_MANIFEST
    return _config_from_manifest(read_manifest(directory, name), str(Path(directory) / name))


# model state

def _unwrap(model: nn.Module) -> nn.Module:
    """The Transfusion inside DDP, AveragedModel (EMA) and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, AveragedModel)):
            model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_coder_key(key: str, prefix: str) -> bool:
    return any(key.startswith(prefix + p) for p in _CODER_PREFIXES)


def _module_state(module: nn.Module, include_coders: bool, prefix: str = '') -> dict:
    """A plain state dict (`prefix`: where the Transfusion sits, 'module.' inside an EMA)."""
    if is_sharded(module):
        raise TypeError('the model is sharded (FSDP2): save_training_state gathers it (call it on every rank); for '
                        'save_pretrained, load a full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict('
                        'model, options=StateDictOptions(full_state_dict=True))) into an unsharded Transfusion.from_config(model.config)')
    return _kept(module.state_dict(), include_coders, prefix)


def _kept(state: dict, include_coders: bool, prefix: str = '') -> dict:
    """`state` without the encoders'/decoders' entries unless they are to be saved."""
    return {k: v for k, v in state.items() if include_coders or not _is_coder_key(k, prefix)}


def _check_state_fits(module: nn.Module, state: dict, with_coders: bool, where: str, prefix: str = '') -> None:
    """Refuse, before anything is loaded, weights whose names or shapes differ from the module's."""
    expected = {k: v.shape for k, v in module.state_dict().items() if with_coders or not _is_coder_key(k, prefix)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f'{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k])}'
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ValueError(f'{where}: the saved weights do not match the model built from the config '
                         f'(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]})')


def _flat(data: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {f'{prefix}{key}': value})
    return out


def config_differences(first: TransfusionConfig, second: TransfusionConfig, names: tuple[str, str]) -> list[str]:
    """The fields in which two configs differ, as 'field: <names[0]> value, <names[1]> value',
    runtime options (RUNTIME_OPTIONS) aside: those change no weights."""
    first_flat, second_flat = _flat(first.to_dict()), _flat(second.to_dict())
    runtime = {f'transformer.{name}' for name in RUNTIME_OPTIONS}
    return [f'{k}: {names[0]} {first_flat.get(k)!r}, {names[1]} {second_flat.get(k)!r}'
            for k in sorted(set(first_flat) | set(second_flat)) if k not in runtime and first_flat.get(k) != second_flat.get(k)]


def _require_same_config(saved: TransfusionConfig, current: TransfusionConfig, where: str) -> None:
    """Runtime options (RUNTIME_OPTIONS) may differ; anything that changes the model may not."""
    differ = config_differences(saved, current, ('saved', 'model'))
    if differ:
        raise ValueError(f'{where}: the checkpoint was saved from a model with a different config: ' + '; '.join(differ))


# pretrained models

def save_pretrained(model: nn.Module, directory: str | os.PathLike, include_coders: bool | None = None) -> None:
    """Save a Transfusion model's config and weights to `directory` (atomically, see module doc).
    include_coders: also save the encoders'/decoders' weights (their modules are still passed
    again at load time); by default when the encoders are trained, whose weights would be lost."""
    model = _unwrap(model)
    modalities = model.modalities
    include_coders = modalities.train_encoders if include_coders is None else bool(include_coders)
    manifest = {
        'config': model.config.to_dict(), 'modality_encoders': list(modalities.has_encoder),
        'modality_decoders': list(modalities.has_decoder), 'train_modality_encoders': modalities.train_encoders,
        'coder_weights': bool(include_coders), 'dtype': _parameter_dtype(model),
    }
    save_checkpoint(directory, PRETRAINED_MANIFEST, manifest, 'weights', _module_state(model, include_coders))


def _parameter_dtype(model: nn.Module) -> str | None:
    """The floating dtype of all parameters ('float32', 'bfloat16', ...), None if they differ."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix('torch.') if len(dtypes) == 1 else None


def _check_coders(model: nn.Module, manifest: dict, where: str) -> None:
    """A modality saved with an encoder/decoder needs one at load time: without it the model would
    take raw data for latents (or return latents for data)."""
    for kind, present in (('encoder', model.modalities.has_encoder), ('decoder', model.modalities.has_decoder)):
        for modality, (was, now) in enumerate(zip(manifest.get(f'modality_{kind}s', ()), present)):
            if was and not now:
                raise ValueError(f'{where}: the model was saved with a modality_{kind} for modality {modality}; '
                                 f'pass it again: from_pretrained(directory, modality_{kind}=...)')


def load_pretrained(directory: str | os.PathLike, modality_encoder: nn.Module | Sequence[nn.Module | None] | None = None,
                    modality_decoder: nn.Module | Sequence[nn.Module | None] | None = None, *,
                    train_modality_encoders: bool | None = None, map_location: MAP_LOCATION = 'cpu', dtype: torch.dtype | None = None,
                    model_class: type | None = None, **runtime_options: Any) -> nn.Module:
    """Rebuild a model saved by `save_pretrained`.

    modality_encoder / modality_decoder: the modules (one, or one per modality) the model was
        built with; required for every modality that had one when saved.
    train_modality_encoders: defaults to the saved setting.
    map_location: where the weights are read to, as for torch.load; a device (e.g. 'cuda')
        also places the model there.
    dtype: the parameters' floating dtype; by default the one they were saved in.
    runtime_options: transformer options that do not change the weights (RUNTIME_OPTIONS), e.g.
        `compile_blocks=True` or `attention_backend='flex'` for a GPU.
    """
    where = str(Path(directory) / PRETRAINED_MANIFEST)
    manifest = read_manifest(directory, PRETRAINED_MANIFEST)
    config = _config_from_manifest(manifest, where)
    unknown = set(runtime_options) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ValueError(f'from_pretrained only overrides runtime options {RUNTIME_OPTIONS}, got {sorted(unknown)}; '
                         'other settings are part of the saved model')
    config = replace(config, transformer = replace(config.transformer, **runtime_options))
    if model_class is None:
        from .transfusion import Transfusion as model_class
    if train_modality_encoders is None:
        train_modality_encoders = bool(manifest.get('train_modality_encoders', False))
    model = model_class.from_config(config, modality_encoder, modality_decoder, train_modality_encoders)
    _check_coders(model, manifest, where)
    state = read_payload(directory, manifest, map_location)
    with_coders = bool(manifest.get('coder_weights', False))
    _check_state_fits(model, state, with_coders, where)
    model.load_state_dict(state, strict = False)    # strict about everything but coders, checked above
    saved_dtype = manifest.get('dtype')
    if dtype is None and saved_dtype is not None:
        dtype = getattr(torch, saved_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f'{where}: "dtype" must name a floating torch dtype, got {saved_dtype!r}')
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.to(dtype) if dtype is not None else model


# training state

class ModelEMA(AveragedModel):
    """torch's AveragedModel whose `update_parameters` also takes an FSDP2-sharded model: it
    gathers each sharded parameter (collective: every rank calls it, after the same step) into
    this unsharded average, which every rank then holds whole."""

    def update_parameters(self, model: nn.Module) -> None:
        model = _unwrap(model)
        super().update_parameters(_FullParameters(model) if is_sharded(model) else model)


class _FullParameters:
    """A sharded model seen through its parameters gathered whole, in the model's order, and its
    (unsharded) buffers: what AveragedModel.update_parameters reads."""

    def __init__(self, model: nn.Module):
        self.model = model

    def parameters(self):
        from torch.distributed.tensor import DTensor
        return (p.full_tensor() if isinstance(p, DTensor) else p for p in self.model.parameters())

    def buffers(self):
        return self.model.buffers()


def make_ema(model: nn.Module, decay: float = 0.999) -> ModelEMA:
    """An exponential moving average of `model`'s parameters (a deep copy):
    `ema_p = decay * ema_p + (1 - decay) * p` on each `ema.update_parameters(model)`, called
    after every optimizer step (the first call copies). Buffers are not averaged: each update
    copies the model's (torch's AveragedModel with use_buffers=False); this model's own are
    constants of the config (rotary and time frequencies, ALiBi slopes), an encoder's are the
    model's current ones. Sample with `ema.module`; save it with
    `save_pretrained(ema, directory)`. Pass the unwrapped model, not the DDP wrapper. Under
    FSDP2, make it before `fully_shard`: the average stays unsharded on every rank, and
    `update_parameters(model)` gathers the shards (call it on every rank)."""
    if not is_real_number(decay):
        raise TypeError(f'decay must be a number in [0, 1], got {type(decay).__name__}')
    if not 0 <= decay <= 1:          # NaN too: torch's own range check lets it through
        raise ValueError(f'decay must be in [0, 1], got {decay}')
    model = _unwrap(model)
    if is_sharded(model):
        raise TypeError('make_ema needs the unsharded model (FSDP2 cannot deep-copy a sharded one): call make_ema(model) '
                        'before fully_shard; its update_parameters(model) then gathers the shards on every rank')
    return ModelEMA(model, multi_avg_fn = get_ema_multi_avg_fn(decay))


@dataclass
class TrainingState:
    """What `load_training_state` returns besides the objects it restores in place."""
    step: int
    extra: dict = field(default_factory = dict)


_PLAIN = (str, int, float, bool, type(None))
# the mappings torch.load(weights_only=True) rebuilds; exact types throughout: a subclass (a
# namedtuple, a defaultdict, an enum key) is pickled as its own class, which it refuses
_MAPPINGS = (dict, OrderedDict, Counter)


def _check_plain(value, where: str) -> None:
    """A training state holds tensors and plain containers only (`extra`, and the optimizer's
    and scheduler's state dicts, e.g. a NumPy learning rate): anything else could be saved but
    not loaded with weights_only=True, and the save would have replaced a good checkpoint."""
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int, bool):
                raise TypeError(f'{where}: keys must be strings or ints, got {type(key).__name__}')
            _check_plain(item, f'{where}[{key!r}]')
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f'{where}[{index}]')
    elif not isinstance(value, torch.Tensor) and type(value) not in _PLAIN:    # exact types: np.float64 is a float
        raise TypeError(f'{where}: {type(value).__module__}.{type(value).__name__} cannot be loaded back safely; '
                        'a training state holds tensors, numbers, strings, None and lists/tuples/dicts of them '
                        '(convert it, e.g. torch.as_tensor(array), float(x), str(path))')


def save_training_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                        ema: AveragedModel | None = None, scheduler: LRScheduler | None = None, extra: dict | None = None,
                        include_coders: bool | None = None) -> None:
    """Save everything needed to resume training exactly: model, optimizer, EMA, scheduler, the
    RNG states, the step and `extra` (tensors and plain containers only), atomically.
    include_coders: save encoder/decoder weights; by default when they are trained.

    With torch.distributed initialised and several ranks, call it on every rank (it is
    collective): it gathers each rank's RNG state and `extra` and, for an FSDP2-sharded model,
    the full model and optimizer states; rank 0 writes."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f'step must be a non-negative int, got {step!r}')
    _check_plain(extra or {}, 'extra')
    local_optimizer_state = optimizer.state_dict()
    _check_plain(local_optimizer_state, 'the optimizer\'s state_dict()')
    if scheduler is not None:
        _check_plain(scheduler.state_dict(), 'the scheduler\'s state_dict()')
    model = _unwrap(model)
    _check_optimizer_of(model, optimizer)
    include = model.modalities.train_encoders if include_coders is None else bool(include_coders)
    per_rank = gathered({'rng': rng_state(), 'extra': extra or {}})     # one collective for both
    rng_states, extras = [r['rng'] for r in per_rank], [r['extra'] for r in per_rank]
    if is_sharded(model):
        model_state, optimizer_state = full_states(model, optimizer)
        model_state = _kept(model_state, include)
    else:
        model_state, optimizer_state = _module_state(model, include), local_optimizer_state
    payload = {'model': model_state, 'optimizer': optimizer_state, 'rng': rng_states[0], 'rng_per_rank': rng_states,
               'extra': extras[0], 'extra_per_rank': extras}
    # no rank goes on (and perhaps loads) before the checkpoint is whole
    on_rank_zero(lambda: _write_training_state(directory, model, optimizer, step, ema, scheduler, include, payload))


def _check_optimizer_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer built for another model (e.g. before the model was rebuilt from
    load_config) would save or take a state that never reaches this model's parameters."""
    own = {id(p) for p in model.parameters()}
    if not any(id(p) in own for group in optimizer.param_groups for p in group['params']):
        raise ValueError('the optimizer holds none of the model\'s parameters: build it from model.parameters() '
                         'of the model passed here (after rebuilding the model, build its optimizer again)')


def _write_training_state(directory, model: nn.Module, optimizer, step: int, ema, scheduler, include: bool,
                          payload: dict) -> None:
    if ema is not None:
        payload['ema'] = _module_state(ema, include, prefix = 'module.')
    if scheduler is not None:
        payload['scheduler'] = scheduler.state_dict()
    manifest = {'config': model.config.to_dict(), 'step': step, 'coder_weights': include,
                'modality_encoders': list(model.modalities.has_encoder), 'modality_decoders': list(model.modalities.has_decoder),
                'has_ema': ema is not None, 'has_scheduler': scheduler is not None,
                'optimizer_class': type(optimizer).__name__, 'scheduler_class': type(scheduler).__name__ if scheduler is not None else None}
    save_checkpoint(directory, TRAINING_MANIFEST, manifest, 'state', payload)


def _check_same_classes(manifest: dict, optimizer, scheduler, where: str) -> None:
    """An optimizer or scheduler of another kind would take the state partly, or fail halfway."""
    for kind, given in (('optimizer', optimizer), ('scheduler', scheduler)):
        saved = manifest.get(f'{kind}_class')
        if given is not None and saved is not None and type(given).__name__ != saved:
            raise ValueError(f'{where}: the training state was saved with a {saved} {kind}, got a {type(given).__name__}')


def load_training_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                        ema: AveragedModel | None = None, scheduler: LRScheduler | None = None, map_location: MAP_LOCATION = 'cpu',
                        restore_rng: bool = True) -> TrainingState:
    """Restore a `save_training_state` checkpoint into the given objects, built as they were when
    saved (the model from `load_config(directory)`). Everything is checked before anything is
    changed; the model's config must equal the saved one up to RUNTIME_OPTIONS.

    With torch.distributed initialised and several ranks, call it on every rank (collective for
    an FSDP2-sharded model): every rank reads the files, restores its own RNG state, gets back
    its own `extra` and, when sharded, takes its shards of rank 0's full states. A checkpoint from an unsharded model
    loads into a sharded one and the other way round."""
    where = str(Path(directory) / TRAINING_MANIFEST)
    manifest = read_manifest(directory, TRAINING_MANIFEST)
    model = _unwrap(model)
    if optimizer is not None:
        _check_optimizer_of(model, optimizer)
    _require_same_config(_config_from_manifest(manifest, where), model.config, where)
    _check_coders(model, manifest, where)
    _check_same_classes(manifest, optimizer, scheduler, where)
    payload = read_payload(directory, manifest, map_location)
    with_coders = bool(manifest.get('coder_weights', False))
    _check_state_fits(model, payload['model'], with_coders, where)
    for name, wanted in (('ema', ema), ('scheduler', scheduler)):
        if wanted is not None and name not in payload:
            raise ValueError(f'{where}: the training state was saved without {"an EMA" if name == "ema" else "a scheduler"}')
    if ema is not None:
        _check_state_fits(ema, payload['ema'], with_coders, where, prefix = 'module.')
    if is_sharded(model):
        load_full_states(model, optimizer, payload['model'], payload['optimizer'])
    else:
        if optimizer is not None:
            optimizer.load_state_dict(payload['optimizer'])       # validates before it changes anything
        model.load_state_dict(payload['model'], strict = False)
    if ema is not None:
        ema.load_state_dict(payload['ema'], strict = False)
    if scheduler is not None:
        scheduler.load_state_dict(payload['scheduler'])
    if restore_rng:
        restore_rng_state(payload.get('rng_per_rank') or [payload['rng']])
    return TrainingState(step = int(manifest['step']), extra = own_rank_entry(payload.get('extra_per_rank') or [payload['extra']]))

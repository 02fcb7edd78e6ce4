"""What a training checkpoint needs from torch.distributed: every rank's RNG state and extra,
and full (unsharded) state dicts of an FSDP2-sharded model and its optimizer.

With a process group of several ranks, saving and loading a training state are collective: every
rank calls them. Rank 0 writes; each rank restores its own RNG state, so a resumed run draws what
the uninterrupted run would have, rank by rank. Optimizer states are stored by parameter index
(`Optimizer.state_dict()`'s format) whether or not the model was sharded, so a checkpoint written
by one layout loads into the other.
"""
from __future__ import annotations

import random
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .rng import set_rng_state


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank_zero(work) -> None:
    """Run `work()` on rank 0 only; every rank returns once it is done, and raises if it failed
    (collective with several ranks: no rank goes on before rank 0 has finished)."""
    rank, world = rank_and_world()
    error = None
    if rank == 0:
        try:
            work()
        except Exception as caught:
            error = caught
    if world > 1:
        outcome = [None if error is None else f'{type(error).__name__}: {error}']
        dist.broadcast_object_list(outcome, src = 0)
        if outcome[0] is not None and error is None:
            raise RuntimeError(f'rank 0 failed: {outcome[0]}')
    if error is not None:
        raise error


def gathered(value) -> list:
    """Every rank's `value` (a picklable object: RNG states, a training state's extra), in rank
    order (collective with several ranks)."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def own_rank_entry(values: list):
    """This rank's entry of a per-rank list saved by `gathered`; saved for fewer ranks, rank r
    takes entry r modulo their number."""
    rank, _ = rank_and_world()
    return values[rank % len(values)]


def restore_rng_state(states: list[dict]) -> None:
    """This rank's saved RNG state. Saved for another number of ranks, a resume cannot be
    exact: ranks beyond the saved ones are re-seeded from a saved state and their rank, so that
    no two ranks draw the same numbers."""
    rank, world = rank_and_world()
    if len(states) == world:
        set_rng_state(states[rank])
        return
    warnings.warn(f'the RNG states were saved for {len(states)} process(es) and this run has {world}: '
                  'training continues with other random draws than the saved run would have made')
    state = own_rank_entry(states)
    set_rng_state(state)
    if rank >= len(states):
        seed = (int(state['torch'][:64].long().sum()) * 1_000_003 + rank) % 2 ** 63
        torch.manual_seed(seed)
        random.seed(seed)
        numpy = sys.modules.get('numpy')
        if numpy is not None:
            numpy.random.seed(seed % 2 ** 32)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 shard (a DTensor)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each parameter the optimizer holds, in the optimizer's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [p.shape for group in optimizer.param_groups for p in group['params'] if id(p) not in names]
    if missing:
        raise ValueError(f'the optimizer holds {len(missing)} parameter(s) that are not the model\'s (shapes {missing[:3]})')
    return [names[id(p)] for group in optimizer.param_groups for p in group['params']]


def _renamed(state: dict, rename) -> dict:
    return {'state': {rename(key): value for key, value in state['state'].items()},
            'param_groups': [{**group, 'params': [rename(key) for key in group['params']]} for group in state['param_groups']]}


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of a sharded model, on rank 0's CPU (empty on the
    other ranks; collective). The optimizer's is keyed by parameter index, like
    `Optimizer.state_dict()`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict = True, cpu_offload = True)
    model_state = get_model_state_dict(model, options = options)
    if not optimizer.state:
        # torch's helper would first initialise the state by a step at lr 0 (Adam's step count
        # then starts at 1, which changes every later update); nothing is sharded yet
        return model_state, optimizer.state_dict()
    optimizer_state = get_optimizer_state_dict(model, optimizer, options = options)
    if not optimizer_state:
        return model_state, optimizer_state
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return model_state, _renamed(optimizer_state, index.__getitem__)


def load_full_states(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optimizer_state: dict | None) -> None:
    """Load full state dicts (as `full_states` returns them, read on every rank) into a sharded
    model and its optimizer; rank 0's copy is scattered to the shards (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict = True, broadcast_from_rank0 = True, strict = False)
    names = _parameter_names(model, optimizer) if optimizer is not None else None
    if optimizer is not None and not optimizer_state['state']:
        # saved before the first step: torch's helper would initialise the state by a step at
        # lr 0 (as in full_states); the plain load takes the hyperparameters and clears the state
        optimizer.load_state_dict(optimizer_state)
    elif optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _renamed(optimizer_state, names.__getitem__), options = options)
    set_model_state_dict(model, model_state, options = options)

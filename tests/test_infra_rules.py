"""Rules of the infrastructure modules that the feature tests do not pin: the U-Net's block
layout and default width, how compile_region and skip_guard_checks talk to torch.compile, and
distributed_state's rank-0 error reporting, RNG restore for another number of ranks and
FSDP2 state gathering (one gloo process here; the two-rank runs live in test_distributed.py)."""
from __future__ import annotations

import inspect
import math
import random
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn, randn

from transfusion_pytorch import compiling, distributed_state, rng
from transfusion_pytorch.unet import LatentUNet


# U-Net

@torch.no_grad()
@pytest.mark.parametrize('shape', [(4, 6), (6,)])
def test_every_position_feeds_only_the_token_of_its_own_block(shape: tuple[int, ...]):
    """Space-to-depth groups contiguous factor^A blocks (not strided positions): changing the
    latent at grid position p changes exactly the token of block p // factor, for every p."""
    unet = LatentUNet(dim_latent = 2, dim_model = 16, factor = 2, axes = len(shape))
    x = randn(1, math.prod(shape), 2)
    tokens = unet.encode(x, shape)[0]
    token_grid = tuple(a // 2 for a in shape)
    for flat, position in enumerate(torch.cartesian_prod(*map(torch.arange, shape)).view(-1, len(shape)).tolist()):
        changed = x.clone()
        changed[0, flat] += 1.
        difference = (unet.encode(changed, shape)[0] - tokens).abs().sum(-1)[0]
        block = [p // 2 for p in position]
        expected = sum(b * math.prod(token_grid[i + 1:]) for i, b in enumerate(block))   # raster index of the block
        assert difference.nonzero().flatten().tolist() == [expected], position


def test_unet_width_defaults_to_4_dim_latent_and_follows_modality_unet_dim():
    """config.py documents unet_dim's default as 4 * dim_latent."""
    from transfusion_pytorch import Transfusion
    kwargs = dict(num_text_tokens = 16, dim_latent = 3, modality_default_shape = (4,), modality_downsample = 2,
                  transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    widths = [Transfusion(**kwargs, **extra).modalities.projections[0].unet.stem[0].out_features
              for extra in ({}, dict(modality_unet_dim = 5))]
    assert widths == [12, 5]
    assert LatentUNet(dim_latent = 3, dim_model = 8, factor = 2, axes = 1).head[-1].in_features == 12


# compile_region

def spy_compile(monkeypatch, takes_recompile_limit: bool) -> list[dict]:
    """Replace torch.compile with a recorder whose signature has (or lacks) recompile_limit, as
    torch versions differ; returns the list of keyword arguments of each call."""
    calls = []
    if takes_recompile_limit:
        def recorder(fn, *, options = None, recompile_limit = None):
            calls.append(dict(options = options, recompile_limit = recompile_limit))
            return fn
    else:
        def recorder(fn, *, options = None):
            calls.append(dict(options = options))
            return fn
    monkeypatch.setattr(torch, 'compile', recorder)
    return calls


def test_compile_region_asks_for_its_own_limit_and_leaves_the_global_one():
    """Where torch.compile takes recompile_limit, the region gets BLOCK_VERSIONS and the
    process-wide dynamo setting (the user's) is not touched."""
    with pytest.MonkeyPatch.context() as monkeypatch, torch._dynamo.config.patch(recompile_limit = 8):
        calls = spy_compile(monkeypatch, takes_recompile_limit = True)
        fn = lambda x: x
        assert compiling.compile_region(fn, {'epilogue_fusion': False}) is fn
        assert calls == [dict(options = {'epilogue_fusion': False}, recompile_limit = compiling.BLOCK_VERSIONS)]
        assert torch._dynamo.config.recompile_limit == 8
    assert 'recompile_limit' in inspect.signature(torch.compile).parameters   # the path the real torch takes here


@pytest.mark.parametrize('before, after', [(8, compiling.BLOCK_VERSIONS), (64, 64)])
def test_compile_region_without_the_keyword_raises_the_global_limit_but_never_lowers_it(before: int, after: int):
    with pytest.MonkeyPatch.context() as monkeypatch, torch._dynamo.config.patch(recompile_limit = before):
        calls = spy_compile(monkeypatch, takes_recompile_limit = False)
        compiling.compile_region(lambda x: x, {'a': 1})
        assert calls == [dict(options = {'a': 1})]
        assert torch._dynamo.config.recompile_limit == after


# skip_guard_checks

FACTOR = 2.


def scaled(x: torch.Tensor) -> torch.Tensor:
    """Reads the module global FACTOR, so its compiled version guards on it."""
    return x * FACTOR


def test_skip_guard_checks_skips_guards_under_the_default_stance(monkeypatch):
    """With one compiled version, a changed global is not re-checked inside (the stale version
    runs), and is outside (a recompile sees the new value)."""
    torch._dynamo.reset()
    compiled = torch.compile(scaled, backend = 'eager')
    x = torch.ones(3)
    assert torch.equal(compiled(x), 2 * x)
    monkeypatch.setattr(sys.modules[__name__], 'FACTOR', 3.)
    with compiling.skip_guard_checks():
        assert torch.equal(compiled(x), 2 * x)
    assert torch.equal(compiled(x), 3 * x)
    torch._dynamo.reset()


def test_skip_guard_checks_keeps_a_forced_backend():
    """A caller's set_stance(force_backend=...) is kept: inside, guards are still checked."""
    with torch.compiler.set_stance(force_backend = 'eager'):
        stance = torch._dynamo.eval_frame._stance
        with compiling.skip_guard_checks():
            assert torch._dynamo.eval_frame._stance is stance and not stance.skip_guard_eval_unsafe
            assert stance.backend == 'eager'


# on_rank_zero

@contextmanager
def as_rank(monkeypatch, rank: int, world: int, broadcast = None):
    """Make distributed_state believe it is `rank` of `world`; `broadcast(objects)` fills in
    what rank 0 would broadcast."""
    monkeypatch.setattr(distributed_state, 'rank_and_world', lambda: (rank, world))
    sent = []

    def fake_broadcast(objects: list, src: int) -> None:
        assert src == 0
        sent.append(list(objects))
        if broadcast is not None:
            broadcast(objects)
    monkeypatch.setattr(dist, 'broadcast_object_list', fake_broadcast)
    yield sent


def failing() -> None:
    raise OSError('disk full')


def test_on_rank_zero_raises_the_works_error_in_one_process():
    with pytest.raises(OSError, match = 'disk full'):
        distributed_state.on_rank_zero(failing)


def test_rank_zero_raises_its_own_error_and_broadcasts_it(monkeypatch):
    with as_rank(monkeypatch, 0, 2) as sent, pytest.raises(OSError, match = 'disk full'):
        distributed_state.on_rank_zero(failing)
    assert sent == [['OSError: disk full']]


def test_other_ranks_skip_the_work_and_raise_rank_zeros_failure(monkeypatch):
    ran = []

    def rank_zero_failed(objects: list) -> None:
        objects[0] = 'OSError: disk full'
    with as_rank(monkeypatch, 1, 2, rank_zero_failed), pytest.raises(RuntimeError, match = 'rank 0 failed: OSError: disk full'):
        distributed_state.on_rank_zero(lambda: ran.append(1))
    assert ran == []
    with as_rank(monkeypatch, 1, 2) as sent:                  # rank 0 succeeded: nothing raised
        distributed_state.on_rank_zero(lambda: ran.append(1))
    assert ran == [] and sent == [[None]]


# restore_rng_state

def saved_states(count: int) -> list[dict]:
    """`count` different RNG states, as gathered(rng_state()) would return them."""
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        random.seed(seed)
        states.append(rng.rng_state())
    return states


def draws_after_restore(monkeypatch, states: list[dict], rank: int, world: int) -> tuple:
    """(torch draws, python draws) of `rank` of `world` right after restoring `states`."""
    monkeypatch.setattr(distributed_state, 'rank_and_world', lambda: (rank, world))
    distributed_state.restore_rng_state(states)
    return tuple(torch.rand(4).tolist()), tuple(random.random() for _ in range(4))


def draws_from(state: dict) -> tuple:
    """What a process draws right after set_rng_state(state)."""
    distributed_state.set_rng_state(state)
    return tuple(torch.rand(4).tolist()), tuple(random.random() for _ in range(4))


def test_each_rank_restores_its_own_state_without_a_warning(monkeypatch):
    states = saved_states(3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for rank in range(3):
            assert draws_after_restore(monkeypatch, states, rank, 3) == draws_from(states[rank])
        assert draws_after_restore(monkeypatch, states[:1], 0, 1) == draws_from(states[0])


def test_fewer_ranks_than_saved_take_their_own_rank_states(monkeypatch):
    states = saved_states(4)
    with pytest.warns(UserWarning, match = r'saved for 4 process\(es\) and this run has 2'):
        assert draws_after_restore(monkeypatch, states, 1, 2) == draws_from(states[1])


def test_more_ranks_than_saved_all_draw_differently(monkeypatch):
    """Saved by 2 ranks, resumed by 5: ranks 0 and 1 take their states, ranks 2..4 are re-seeded
    from a saved state and their rank, so no two ranks draw the same numbers (torch or random)."""
    states = saved_states(2)
    with pytest.warns(UserWarning, match = r'saved for 2 process\(es\) and this run has 5'):
        draws = [draws_after_restore(monkeypatch, states, rank, 5) for rank in range(5)]
    assert draws[:2] == [draws_from(states[0]), draws_from(states[1])]
    for kind in (0, 1):
        assert len({d[kind] for d in draws}) == 5, kind


# FSDP2 in one gloo process

@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of world size 1 and its CPU device mesh."""
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip('needs torch.distributed with gloo and no process group yet')
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group('gloo', init_method = f'file://{tmp_path / "store"}', rank = 0, world_size = 1)
    try:
        yield init_device_mesh('cpu', (1,))
    finally:
        dist.destroy_process_group()


def two_layers() -> nn.Sequential:
    """A model small enough to shard in a test."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def stepped_adam(model: nn.Module) -> torch.optim.Optimizer:
    """An AdamW with moments after one step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-2)
    model(torch.ones(2, 3)).square().sum().backward()
    optimizer.step()
    return optimizer


def test_sharding_some_submodules_counts_as_sharded(one_rank_group):
    from torch.distributed.fsdp import fully_shard
    model = two_layers()
    assert not distributed_state.is_sharded(model)
    fully_shard(model[0], mesh = one_rank_group)           # the root left plain: a partly sharded model
    assert distributed_state.is_sharded(model)


def test_full_optimizer_state_is_keyed_by_parameter_index(one_rank_group):
    """full_states gives Optimizer.state_dict()'s layout (state and param_groups by index),
    which load_full_states and a plain optimizer both take back."""
    from torch.distributed.fsdp import fully_shard
    plain = two_layers()
    expected = stepped_adam(plain).state_dict()
    sharded = fully_shard(two_layers(), mesh = one_rank_group)
    model_state, optimizer_state = distributed_state.full_states(sharded, stepped_adam(sharded))
    assert [g['params'] for g in optimizer_state['param_groups']] == [g['params'] for g in expected['param_groups']] == [[0, 1, 2, 3]]
    assert sorted(optimizer_state['state']) == [0, 1, 2, 3]
    for index, moments in expected['state'].items():
        torch.testing.assert_close(optimizer_state['state'][index]['exp_avg'], moments['exp_avg'])
    reloaded = two_layers()
    optimizer = torch.optim.AdamW(reloaded.parameters(), lr = 1e-2)
    optimizer.load_state_dict(optimizer_state)                 # a sharded checkpoint into a plain run
    torch.testing.assert_close(optimizer.state[reloaded[1].bias]['exp_avg_sq'], expected['state'][3]['exp_avg_sq'])


def test_loading_names_an_optimizer_parameter_foreign_to_the_model():
    model, stranger = two_layers(), nn.Parameter(torch.zeros(7, 5))
    optimizer = torch.optim.AdamW([*model.parameters(), stranger])
    with pytest.raises(ValueError, match = r"the optimizer holds 1 parameter\(s\) that are not the model's \(shapes \[torch.Size\(\[7, 5\]\)\]\)"):
        distributed_state.load_full_states(model, optimizer, {}, {'state': {}, 'param_groups': []})


def test_a_state_saved_before_the_first_step_loads_into_a_sharded_optimizer(one_rank_group):
    """Saved before any step (no moments yet): loading takes the saved hyperparameters and
    clears whatever state the sharded optimizer had, as a plain optimizer's load_state_dict does."""
    from torch.distributed.fsdp import fully_shard
    sharded = fully_shard(two_layers(), mesh = one_rank_group)
    optimizer = stepped_adam(sharded)                          # lr 1e-2, with moments
    plain = two_layers()
    saved = torch.optim.AdamW(plain.parameters(), lr = 0.5, weight_decay = 0.).state_dict()
    distributed_state.load_full_states(sharded, optimizer, plain.state_dict(), saved)
    assert [(g['lr'], g['weight_decay']) for g in optimizer.param_groups] == [(0.5, 0.)]
    assert len(optimizer.state) == 0


def sine_plus_one(x):
    return torch.sin(x) + 1


def test_compiled_graphs_of_an_own_code_copy_stay_off_the_module_globals():
    """Dynamo stores each compiled graph in the function's globals (__compiled_fn_*): the copy's
    graphs must go with the copy, not pile up in the defining module."""
    torch._dynamo.reset()
    compiled_names = lambda: {k for k in globals() if k.startswith('__compiled_fn')}
    before = compiled_names()
    copy = compiling.with_own_code(sine_plus_one)
    x = randn(3)
    torch.testing.assert_close(torch.compile(copy, backend = 'eager')(x), sine_plus_one(x))
    assert any(k.startswith('__compiled_fn') for k in copy.__globals__)    # the graph went with the copy
    assert compiled_names() == before

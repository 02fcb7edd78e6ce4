"""Scaling out: DDP and FSDP2 under torchrun give single-process gradients, every parameter gets a
gradient whatever the batch holds, blocks compile without graph breaks, and activation
checkpointing does not change gradients.

How per-rank losses combine. The loss is a mean over tokens (text cross-entropy over text
targets, flow MSE over latent values per modality, then a weighted mean over the modalities
present). DDP and FSDP2 average the ranks' gradients, i.e. they differentiate the mean of the
per-rank losses. That equals the loss of the union batch exactly when every rank has the same
number of text targets and of latent tokens per modality (the 'balanced' case). Otherwise (a rank
without some modality, or different token counts) the union-batch loss weights tokens
differently, and the single-process equivalent is the gradient of the mean of the per-rank losses;
`test_union_batch_is_the_wrong_reference_when_ranks_differ` shows the two differ.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import randint, randn

from transfusion_pytorch import Transfusion, TransfusionConfig

from conftest import tiny_model

WORKER = Path(__file__).with_name('distributed_worker.py')
WRAPPINGS = ('ddp', 'fsdp_blocks', 'fsdp_model')


def small_model(modality_experts: bool = False, **transformer) -> Transfusion:
    return tiny_model(time_conditioning = 'adaptive', modality_experts = modality_experts,
                      transformer = dict(dim = 32, depth = 2, heads = 2, dim_head = 16, **transformer))


# expert weights sit in the blocks, which FSDP2 (per block) gathers only while they run
MODELS = {'plain': {}, 'experts': dict(modality_experts = True)}


def rank_input(seed: int, layout: str):
    """(batch, times, noise) for one rank. 'full': both modalities; 'no_modality_1': fewer tokens
    and no instance of modality 1; 'text_only': no modality at all."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: randint(0, 16, (n,), generator = g)
    if layout == 'full':
        batch = [[ids(5), randn(2, 3, 8, generator = g), ids(3)], [(1, randn(3, 4, generator = g)), ids(4)]]
    elif layout == 'no_modality_1':
        batch = [[ids(6), randn(1, 2, 8, generator = g)], [ids(2)]]
    else:
        batch = [[ids(7)], [ids(3)]]
    instances = [item for sample in batch for item in sample if isinstance(item, tuple) or item.is_floating_point()]
    latents = [item[1] if isinstance(item, tuple) else item for item in instances]
    times = torch.rand(len(latents), generator = g)
    return batch, times, [randn(x.shape, generator = g) for x in latents]


CASES = {'balanced': ('full', 'full'), 'rank_without_a_modality': ('full', 'no_modality_1'), 'text_only_rank': ('full', 'text_only')}


def case_inputs() -> dict:
    return {case: [rank_input(rank + 10 * i, layout) for rank, layout in enumerate(layouts)]
            for i, (case, layouts) in enumerate(CASES.items())}


def reference_gradients(config: TransfusionConfig, state: dict, loss_of) -> dict:
    model = Transfusion.from_config(config)
    model.load_state_dict(state)
    loss_of(model).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def union_gradients(config, state, per_rank) -> dict:
    """Single process, one batch holding every rank's samples (times and noise in that order)."""
    batch = [sample for b, _, _ in per_rank for sample in b]
    times = torch.cat([t for _, t, _ in per_rank])
    noise = [n for _, _, rank_noise in per_rank for n in rank_noise]
    return reference_gradients(config, state, lambda model: model(batch, times = times, noise = noise))


def rank_mean_gradients(config, state, per_rank) -> dict:
    """Single process, the mean of the per-rank losses: what averaging gradients computes."""
    return reference_gradients(config, state, lambda model: sum(
        model(b, times = t, noise = n) for b, t, n in per_rank) / len(per_rank))


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol = 1e-6, rtol = 1e-5, msg = lambda m: f'{name}: {m}')


@pytest.fixture(scope = 'module')
def torchrun_gradients(tmp_path_factory):
    """Run the worker once under torchrun with 2 CPU processes; every distributed test reads it."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip('needs torch.distributed with the gloo backend')
    torch.manual_seed(0)
    models = {name: small_model(**options) for name, options in MODELS.items()}
    inputs = {'models': {name: {'config': m.config.to_dict(), 'state': m.state_dict()} for name, m in models.items()},
              'cases': case_inputs()}
    workdir = tmp_path_factory.mktemp('torchrun')
    torch.save(inputs, workdir / 'inputs.pt')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(WORKER), str(workdir)]
    result = subprocess.run(command, capture_output = True, text = True, timeout = 240, env = {**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models = {name: (m.config, inputs['models'][name]['state']) for name, m in models.items()}
    return models, inputs['cases'], torch.load(workdir / 'grads.pt', weights_only = True)


@pytest.mark.distributed
@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('wrapping', WRAPPINGS)
def test_balanced_ranks_match_the_union_batch(torchrun_gradients, wrapping, model):
    models, cases, grads = torchrun_gradients
    config, state = models[model]
    assert_same_gradients(grads[f'{model}/{wrapping}/balanced'], union_gradients(config, state, cases['balanced']))


@pytest.mark.distributed
@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('wrapping', WRAPPINGS)
@pytest.mark.parametrize('case', ['rank_without_a_modality', 'text_only_rank'])
def test_unequal_ranks_match_the_mean_of_rank_losses(torchrun_gradients, wrapping, case, model):
    """A rank without modality 1 (or without any modality) still sends a gradient for every
    parameter, so plain DDP (no find_unused_parameters) and FSDP2 run a second iteration and
    agree with one process; modality 1's head learns from rank 0 alone."""
    models, cases, grads = torchrun_gradients
    config, state = models[model]
    actual = grads[f'{model}/{wrapping}/{case}']
    assert_same_gradients(actual, rank_mean_gradients(config, state, cases[case]))
    assert actual['modalities.projections.1.proj_out.weight'].abs().sum() > 0


@pytest.mark.distributed
def test_two_process_runs_resume_exactly_under_ddp_and_fsdp2(tmp_path):
    """Saving and loading a training state are collective: each rank gets its own RNG state
    back (so the ranks keep drawing different times and noise) and an FSDP2-sharded model and
    optimizer are gathered and scattered; 2 steps, save, load into a fresh model, 2 steps ==
    4 steps straight, rank by rank. A save before the first step (an optimizer without state,
    which torch's FSDP2 state-dict helpers would initialise with a step) changes nothing, and
    loading it gives the straight run. An EMA made before wrapping (FSDP2 cannot deep-copy a
    sharded model) gathers the shards on each update and resumes with the rest. A DDP checkpoint
    also loads into the sharded model."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip('needs torch.distributed with the gloo backend')
    worker = Path(__file__).with_name('resume_distributed_worker.py')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(worker), str(tmp_path)]
    result = subprocess.run(command, capture_output = True, text = True, timeout = 240, env = {**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    per_rank = json.loads((tmp_path / 'results.json').read_text())
    for rank, results in enumerate(per_rank):
        for wrapping in ('ddp', 'fsdp_blocks'):
            case = results[wrapping]
            assert case['resumed'] == case['straight'][2:], (rank, wrapping)
            assert case['from_start'] == case['straight'], (rank, wrapping)
            assert case['same_average'], (rank, wrapping)
            assert case['extra'] == 1000 * rank + 2, (rank, wrapping)        # each rank's own extra
            assert case['rng_differs'], wrapping
        assert results['ddp_checkpoint_loads_sharded']
    assert per_rank[0]['ddp']['straight'] != per_rank[1]['ddp']['straight']   # the ranks did see different data


def test_union_batch_is_the_wrong_reference_when_ranks_differ():
    torch.manual_seed(0)
    model = small_model()
    config, state = model.config, model.state_dict()
    per_rank = case_inputs()['rank_without_a_modality']
    union, mean = union_gradients(config, state, per_rank), rank_mean_gradients(config, state, per_rank)
    assert not torch.allclose(union['to_logits.weight'], mean['to_logits.weight'], atol = 1e-5)
    balanced = case_inputs()['balanced']
    assert_same_gradients(union_gradients(config, state, balanced), rank_mean_gradients(config, state, balanced))


@pytest.mark.parametrize('batch', [
    pytest.param(lambda: [[randint(0, 16, (4,)), randn(2, 3, 8)]], id = 'no_modality_1'),
    pytest.param(lambda: [[randint(0, 16, (4,))], [randint(0, 16, (2,))]], id = 'text_samples'),
    pytest.param(lambda: randint(0, 16, (2, 6)), id = 'text_only_tensor'),
    pytest.param(lambda: randn(2, 3, 4), id = 'modality_1_only'),
])
def test_every_parameter_gets_a_gradient_whatever_the_batch(batch):
    """What lets DDP run without find_unused_parameters: absent parts get exact zero gradients."""
    model = small_model()
    data = batch()
    model(data, modality_type = 1 if torch.is_tensor(data) and data.is_floating_point() else None).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


# compile and activation checkpointing

def block_call(model: Transfusion, index: int = 1) -> tuple:
    """The positional arguments one Block receives in a real training forward."""
    captured = []
    hook = model.transformer.blocks[index].register_forward_pre_hook(lambda module, args: captured.append(args))
    try:
        model([[randint(0, 16, (5,)), randn(2, 3, 8)], [(1, randn(3, 4)), randint(0, 16, (2,))]])
    finally:
        hook.remove()
    return captured[0]


@pytest.mark.parametrize('options', [dict(), dict(qk_norm = True, value_residual = True, laser = True), dict(ff_pad_multiple = 16)],
                         ids = ['plain', 'all_options', 'padded_feed_forward'])
def test_a_block_compiles_as_one_graph(options):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward like
    inductor would, without a C++ toolchain."""
    model = small_model(**options)
    block = model.transformer.blocks[1]
    args = block_call(model)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph = True, backend = 'aot_eager')
    out, _ = compiled(*args)
    expected, _ = block(*args)
    torch.testing.assert_close(out, expected)
    grad, = torch.autograd.grad(out.square().sum(), block.attn.to_qkv.weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_compiled_blocks_have_a_version_for_every_mode(monkeypatch):
    """Training, predict, predict with gradients, cached sampling, with value residual (the first
    block differs): more versions of Block.forward than torch's default recompile limit of 8,
    past which calls would quietly run eagerly; fail_on_recompile_limit_hit makes that an error."""
    original = torch.compile

    @functools.wraps(original)
    def eager_compile(fn, **kwargs):     # the same guards and versions as inductor, compiled fast
        kwargs.pop('options', None)
        kwargs.pop('backend', None)      # the ODE evaluation's Inductor that records its calls (replay.py)
        return original(fn, backend = 'eager', **kwargs)

    monkeypatch.setattr(torch, 'compile', eager_compile)
    torch._dynamo.reset()
    model = small_model(value_residual = True, dropout = 0.1, compile_blocks = True)
    batch, times, noise = rank_input(0, 'full')
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit = True):
        model(batch, times = times, noise = noise).backward()
        model.predict(batch, times, noise)
        model.predict_packed(model.pack(batch), times, noise).velocities[0].sum().backward()
        model.sample_many([None, randint(0, 16, (3,))], max_length = 24, modality_steps = 2, seed = 0, show_progress = False,
                          fixed_modality_shape = {0: (2, 3), 1: (3,)})
        model(batch, times = times, noise = noise).backward()


@pytest.mark.parametrize('stack', [False, True], ids = ['per_block', 'whole_stack'])
def test_compile_blocks_option_trains_with_fullgraph_blocks(monkeypatch, stack):
    """Through the real compile_blocks path (each block, or with compile_stack the whole stack
    as one region), with torch.compile forced to fullgraph=True: the training step compiles
    without a graph break and gives the eager gradients."""
    eager = small_model()
    fast = small_model(compile_blocks = True, compile_stack = stack, compile_options = {'epilogue_fusion': False})
    original, compiled = torch.compile, []

    def fullgraph_compile(module, **kwargs):
        compiled.append(module)
        assert kwargs.pop('options') == {'epilogue_fusion': False}   # compile_options reach torch.compile
        return original(module, fullgraph = True, backend = 'aot_eager')

    monkeypatch.setattr(torch, 'compile', fullgraph_compile)
    torch._dynamo.reset()
    fast.load_state_dict(eager.state_dict())
    batch, times, noise = rank_input(0, 'full')
    for model in (eager, fast):
        model(batch, times = times, noise = noise).backward()
    if stack:   # the stack's method, on a copy of its code for this configuration (compiling.shared_code)
        assert [(region.__self__, region.__func__.__name__) for region in compiled] == [(fast.transformer, '_run_stack')]
    else:
        assert compiled == list(fast.transformer.blocks)
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol = 1e-6, rtol = 1e-5, msg = lambda m: f'{name}: {m}')


def test_training_step_graph_breaks_stay_outside_the_blocks():
    """Compiling the whole training step breaks only in batch packing and validation (host-side
    by design), never in the transformer."""
    model = small_model()
    batch, times, noise = rank_input(0, 'full')
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(batch, times = times, noise = noise)
    inside = [reason.reason for reason in explanation.break_reasons
              if any(Path(frame.filename).name in ('transformer.py', 'attention.py', 'positions.py') for frame in reason.user_stack)]
    assert explanation.graph_count >= 1 and not inside, inside


def test_activation_checkpointing_gives_the_same_gradients():
    """With dropout on: checkpointing replays the RNG state, so recomputation draws the same masks."""
    plain = small_model(dropout = 0.1)
    checkpointed = small_model(dropout = 0.1, checkpoint_activations = True)
    checkpointed.load_state_dict(plain.state_dict())
    batch, times, noise = rank_input(0, 'full')
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(batch, times = times, noise = noise).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol = 1e-6, rtol = 1e-5, msg = lambda m: f'{name}: {m}')

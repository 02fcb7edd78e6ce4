"""The compiled ODE evaluation: the same samples as eager, its graph called directly after two
evaluations, no recompiles across calls, left out of copies; compiled prompt prefills: eager's
logits, a bounded number of compiles; and a caller's force_eager kept where the text decoder
skips guard checks."""
import copy

import pytest
import torch
from torch import randint, randn

from conftest import tiny_model
from test_autocast_weights import randomized
from test_sampling import assert_samples_equal

QUIET = dict(show_progress = False)
COMPILED = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, compile_blocks = True)


def eager_twin(model):
    twin = tiny_model(transformer = dict(COMPILED, compile_blocks = False), time_conditioning = model.config.time_conditioning)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize('time_conditioning', ['additive', 'adaptive'])
def test_compiled_evaluations_sample_like_eager(time_conditioning):
    """Rows in different phases, guidance (each row twice, one copy isolated), both modalities;
    with adaptive conditioning the per-block modulations are computed inside the region."""
    model = randomized(tiny_model(transformer = COMPILED, time_conditioning = time_conditioning))
    prompts = [None, randint(0, 16, (3,)), [randint(0, 16, (2,)), (1, randn(3, 4))]]
    kwargs = dict(max_length = 40, modality_steps = 3, text_temperature = 1., cfg_scale = 2., seed = [1, 2, 3], **QUIET)
    compiled, eager = model.sample_many(prompts, **kwargs), eager_twin(model).sample_many(prompts, **kwargs)
    assert any(isinstance(x, tuple) for sample in compiled for x in sample)   # some ODE was integrated
    for a, b in zip(compiled, eager):
        assert_samples_equal(a, b, atol = 1e-4)


def test_compiled_evaluation_is_reused_across_calls_and_left_out_of_copies():
    model = randomized(tiny_model(transformer = COMPILED))
    run = lambda m: m.generate_modality_only(2, 1, (5,), modality_steps = 4, seed = 0)
    first = run(model)
    assert '_compiled_evaluation' in model.__dict__
    stats = dict(torch._dynamo.utils.counters['stats'])
    again = run(model)
    assert dict(torch._dynamo.utils.counters['stats']) == stats   # nothing traced again
    assert torch.equal(first, again)
    twin = copy.deepcopy(model)
    assert '_compiled_evaluation' not in twin.__dict__
    torch.testing.assert_close(run(twin), first, atol = 1e-5, rtol = 1e-5)


def test_each_model_s_compiled_evaluation_has_its_own_versions(monkeypatch):
    """Every model compiles the same evaluation function with a backend of its own; were the
    versions kept on one shared code object, models past the recompile limit (lowered to 2 here)
    would evaluate eagerly, their graphs never called."""
    from transfusion_pytorch import compiling
    monkeypatch.setattr(compiling, 'BLOCK_VERSIONS', 2)
    for index in range(3):
        model = randomized(tiny_model(transformer = COMPILED))
        compiled = model.generate_modality_only(1, 1, (5,), modality_steps = 2, seed = 0)
        assert model._compiled_evaluation.recorder.calls > 0, index
        torch.testing.assert_close(compiled, eager_twin(model).generate_modality_only(1, 1, (5,), modality_steps = 2, seed = 0),
                                   atol = 1e-5, rtol = 1e-5)


def test_evaluations_after_the_first_two_of_a_solve_call_the_graph_directly(monkeypatch):
    """The samples of the test above come from replayed graphs (replay.py); here, how many."""
    from transfusion_pytorch.replay import Replayed
    model = randomized(tiny_model(transformer = COMPILED))
    calls, through = [], []
    call, through_torch_compile = Replayed.__call__, Replayed._through_torch_compile
    monkeypatch.setattr(Replayed, '__call__', lambda self, *inputs: calls.append(1) or call(self, *inputs))
    monkeypatch.setattr(Replayed, '_through_torch_compile', lambda self, inputs: through.append(1) or through_torch_compile(self, inputs))
    model.generate_modality_only(2, 1, (5,), modality_steps = 4, seed = 0)
    assert (len(calls), len(through)) == (2 * 4, 2)   # 4 midpoint steps, 2 evaluations each


def test_a_callers_force_eager_is_kept_through_the_loops():
    """Skipping guard checks sets a stance; it must not replace force_eager with the default
    stance (forward hooks, which compiled code skips, would then miss tokens)."""
    model = randomized(tiny_model(transformer = COMPILED))
    model.generate_modality_only(1, 1, (5,), modality_steps = 4, seed = 0)         # compiled versions exist
    model.generate_text_only(randint(0, 16, (1, 2)), 10, temperature = 0.)
    evaluations, tokens = [], []
    model.modalities.projections[1].proj_out.register_forward_pre_hook(lambda *_: evaluations.append(1))
    model.transformer.final_norm.register_forward_pre_hook(lambda *_: tokens.append(1))
    with torch.compiler.set_stance('force_eager'):
        model.generate_modality_only(1, 1, (5,), modality_steps = 4, seed = 0)
        assert len(evaluations) == 2 * 4              # 4 midpoint steps, 2 evaluations each
        tokens.clear()
        model.generate_text_only(randint(0, 16, (1, 2)), 10, temperature = 0.)
        assert len(tokens) == 1 + 7                   # the prompt's prefill, then a step for each new token but the last



def test_compiled_prefills_match_eager_and_stop_recompiling():
    """CPU prompt prefills run the compiled blocks: each length gives eager's logits, and after
    the first lengths (static, then dynamic) a new length compiles nothing."""
    from transfusion_pytorch.items import ModalityItem, TextItem
    from transfusion_pytorch.decoding import CachedRunner
    model = randomized(tiny_model(transformer = COMPILED)).eval()
    twin = eager_twin(model).eval()
    prompt = lambda n: [TextItem(randint(0, 16, (n,))), ModalityItem(1, randn(3, 4))]
    torch._dynamo.reset()   # else graphs compiled for an earlier test's model of this shape serve this one
    graphs = lambda: torch._dynamo.utils.counters['stats']['unique_graphs']
    before, counts = graphs(), []
    with torch.no_grad():
        for n in (2, 3, 4, 6, 9, 13):
            items = prompt(n)
            logits, length = CachedRunner(model, 1, 64).prefill(0, items)
            expected, expected_length = CachedRunner(twin, 1, 64).prefill(0, items)
            assert length == expected_length
            torch.testing.assert_close(logits, expected, atol = 1e-4, rtol = 1e-4)
            counts.append(graphs())
    assert before < counts[0] < counts[1] == counts[-1] and len(set(counts[1:])) == 1, (before, counts)

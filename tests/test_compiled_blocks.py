"""Compiled blocks and stacks: a compiled stack keeps its versions per transformer configuration,
so a process that builds models of several configurations (a sweep, a notebook) compiles each
one's stack, where one pool of versions shared by every model in the process would fill up and
leave later models' stacks running eagerly; models of one configuration (an EMA copy) share
theirs. Either way of compiling leaves a block's forward hooks running."""
import copy
import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_model
from test_autocast_weights import randomized


def text_model(dim: int, **transformer):
    config = dict(dim = dim, depth = 2, heads = 2, dim_head = 16, compile_blocks = True, **transformer)
    return randomized(tiny_model(transformer = config)).eval()


def eager_loss(model, text):
    settings = dict(dim = model.transformer.config.dim, compile_blocks = False)
    twin = tiny_model(transformer = dict(depth = 2, heads = 2, dim_head = 16, **settings)).eval()
    twin.load_state_dict(model.state_dict())
    return twin(text)


def graphs_compiled() -> int:
    return counters['stats']['unique_graphs']


def test_each_configuration_compiles_its_own_stack(monkeypatch):
    """With room for one version per region, two configurations each still compile their stack
    (a shared pool would be full after the first, and the second would run eagerly), and the
    compiled losses equal eager ones."""
    from transfusion_pytorch import compiling
    monkeypatch.setattr(compiling, 'BLOCK_VERSIONS', 1)
    torch._dynamo.reset()
    text = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        for dim in (32, 48):
            model = text_model(dim, compile_stack = True)
            before = graphs_compiled()
            loss = model(text)
            assert graphs_compiled() > before, dim
            torch.testing.assert_close(loss, eager_loss(model, text), atol = 1e-5, rtol = 1e-5)


def test_a_copy_of_a_model_shares_its_stack_versions_and_they_go_with_the_last_model():
    """An EMA-style deep copy runs on the versions its original compiled (nothing traced again);
    when no model of that configuration is left, its code and versions are released."""
    torch._dynamo.reset()
    text = torch.randint(0, 16, (2, 9))
    model = text_model(40, compile_stack = True)
    with torch.no_grad():
        loss = model(text)
        stats = dict(counters['stats'])
        twin = copy.deepcopy(model)
        assert torch.equal(twin(text), loss)
        assert dict(counters['stats']) == stats
    code = weakref.ref(model.transformer._compiled_stack._torchdynamo_orig_callable.__func__)
    del model, twin
    gc.collect()
    assert code() is None


@pytest.mark.parametrize('compile_settings', [dict(), dict(compile_stack = True)], ids = ['per_block', 'stack'])
def test_forward_hooks_on_a_compiled_block_still_run(compile_settings):
    """A researcher's forward hook on a block sees every call's output, whether the block is
    compiled as a module (its hooks run outside the compiled frame) or inside the stack."""
    model = text_model(24, **compile_settings)
    outputs = []
    model.transformer.blocks[1].register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    with torch.no_grad():
        model(torch.randint(0, 16, (2, 9)))
        model(torch.randint(0, 16, (3, 5)))
    assert [tuple(output.shape) for output in outputs] == [(2, 9, 24), (3, 5, 24)]

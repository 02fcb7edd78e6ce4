"""Compiled blocks and stacks keep their versions per model configuration: a process that builds
models of several configurations (a sweep, a notebook) compiles each one's blocks, where one
pool of versions shared by every model in the process would fill up and leave later models'
blocks running eagerly; models of one configuration (an EMA copy) share theirs."""
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


STACK = [pytest.param(dict(), id = 'per_block'), pytest.param(dict(compile_stack = True), id = 'stack')]


@pytest.mark.parametrize('compile_settings', STACK)
def test_each_configuration_compiles_its_own_versions(monkeypatch, compile_settings):
    """With room for one version per region, two configurations each still compile theirs (a
    shared pool would be full after the first, and the second would run eagerly), and the
    compiled losses equal eager ones."""
    from transfusion_pytorch import compiling
    monkeypatch.setattr(compiling, 'BLOCK_VERSIONS', 1)
    torch._dynamo.reset()
    text = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        for dim in (32, 48):
            model = text_model(dim, **compile_settings)
            before = graphs_compiled()
            loss = model(text)
            assert graphs_compiled() > before, dim
            torch.testing.assert_close(loss, eager_loss(model, text), atol = 1e-5, rtol = 1e-5)


def test_a_copy_of_a_model_shares_its_versions_and_they_go_with_the_last_model():
    """An EMA-style deep copy runs on the versions its original compiled (nothing traced again);
    when no model of that configuration is left, its versions are released."""
    torch._dynamo.reset()
    text = torch.randint(0, 16, (2, 9))
    model = text_model(40)
    with torch.no_grad():
        loss = model(text)
        stats = dict(counters['stats'])
        twin = copy.deepcopy(model)
        assert torch.equal(twin(text), loss)
        assert dict(counters['stats']) == stats
    code = weakref.ref(model.transformer.blocks[0].forward.__func__)
    del model, twin
    gc.collect()
    assert code() is None


def test_forward_hooks_on_a_compiled_block_still_run():
    """Compiling a block compiles its forward's frame; the module's hooks stay outside, in
    Python, so a researcher's hook sees every call's output."""
    model = text_model(24)
    outputs = []
    model.transformer.blocks[1].register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    with torch.no_grad():
        model(torch.randint(0, 16, (2, 9)))
        model(torch.randint(0, 16, (3, 5)))
    assert [tuple(output.shape) for output in outputs] == [(2, 9, 24), (3, 5, 24)]

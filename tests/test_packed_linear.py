"""MKL-packed weights in the compiled ODE evaluation on CPU: the same samples as the ordinary
products, the packed products really run, a weight changed between calls (by an optimizer or
through .data) is packed again, a model that sampled still copies and pickles, and Inductor's
own lowering of mkl::_mkl_linear is restored."""
import copy
import io

import pytest
import torch
from torch import randint

from conftest import tiny_model
from test_autocast_weights import randomized
from transfusion_pytorch import decoding, packed_linear

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason = 'needs a PyTorch built with MKL')

COMPILED = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, compile_blocks = True)


def generate(model, packed: bool, monkeypatch, **kwargs):
    monkeypatch.setattr(packed_linear, 'ENABLED', packed)
    return model.generate_modality_only(2, 1, (5,), modality_steps = 4, seed = 0, **kwargs)


def packed_products(model, monkeypatch) -> int:
    """How many products by packed weights one call runs (the profiler sees the op's calls
    from the compiled code too)."""
    with torch.profiler.profile() as profile:
        generate(model, True, monkeypatch)
    return sum(event.count for event in profile.key_averages() if event.key == 'mkl::_mkl_linear')


@pytest.mark.parametrize('options', [{}, {'cpp_wrapper': True}], ids = ['python-wrapper', 'cpp-wrapper'])
def test_packed_evaluations_sample_like_ordinary_products(options, monkeypatch):
    model = randomized(tiny_model(transformer = dict(COMPILED, compile_options = options)))
    packed, ordinary = generate(model, True, monkeypatch), generate(model, False, monkeypatch)
    torch.testing.assert_close(packed, ordinary, atol = 1e-5, rtol = 1e-5)
    # 4 midpoint steps, 2 evaluations each, 4 products per block, 2 blocks
    assert packed_products(model, monkeypatch) == 8 * 4 * 2


def test_guided_evaluations_pack_for_their_doubled_rows(monkeypatch):
    model = randomized(tiny_model(transformer = COMPILED))
    packed_rows = []
    monkeypatch.setattr(decoding, 'block_packs', lambda model, rows: packed_rows.append(rows) or packed_linear.block_packs(model, rows))
    packed, ordinary = generate(model, True, monkeypatch, cfg_scale = 2.), generate(model, False, monkeypatch, cfg_scale = 2.)
    torch.testing.assert_close(packed, ordinary, atol = 1e-5, rtol = 1e-5)
    assert packed_rows == [2 * 2 * 5, 2 * 2 * 5]                    # once a call: 2 samples, each twice, 5 tokens


def test_a_weight_changed_in_place_is_packed_again(monkeypatch):
    """An optimizer step writes the weights in place; a pack of the old weights would sample
    the old model."""
    model = randomized(tiny_model(transformer = COMPILED))
    before = generate(model, True, monkeypatch)
    optimizer = torch.optim.SGD(model.parameters(), lr = 0.5)
    model.train()
    model([[randint(0, 16, (6,)), (1, torch.randn(5, 4))]]).backward()
    optimizer.step()
    model.eval()
    after, reference = generate(model, True, monkeypatch), generate(model, False, monkeypatch)
    assert not torch.allclose(after, before, atol = 1e-3)
    torch.testing.assert_close(after, reference, atol = 1e-5, rtol = 1e-5)


def test_a_weight_changed_through_data_is_packed_again(monkeypatch):
    """EMA libraries write `param.data` in place: its storage and version counter stay the same,
    so no key could tell a pack kept from an earlier call was stale."""
    model = randomized(tiny_model(transformer = COMPILED))
    before = generate(model, True, monkeypatch)
    for block in model.transformer.blocks:
        block.attn.to_qkv.weight.data.mul_(3.)
        block.ff.to_out.weight.data.lerp_(torch.randn_like(block.ff.to_out.weight), 0.5)
    after, reference = generate(model, True, monkeypatch), generate(model, False, monkeypatch)
    assert not torch.allclose(after, before, atol = 1e-3)
    torch.testing.assert_close(after, reference, atol = 1e-5, rtol = 1e-5)


def test_a_model_that_sampled_copies_and_pickles(monkeypatch):
    """MKL's packed tensors cannot be copied; none stays on the model after a call."""
    model = randomized(tiny_model(transformer = COMPILED))
    first = generate(model, True, monkeypatch)
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    torch.testing.assert_close(generate(twin, True, monkeypatch), first, atol = 1e-5, rtol = 1e-5)


def test_no_packs_with_gradients_or_autocast():
    model = tiny_model(transformer = COMPILED)
    with torch.no_grad():
        assert packed_linear.block_packs(model, 10) is not None
        with torch.autocast('cpu', dtype = torch.bfloat16):
            assert packed_linear.block_packs(model, 10) is None
    assert packed_linear.block_packs(model, 10) is None                # mkl::_mkl_linear has no backward


def test_inductors_own_lowering_is_restored():
    from torch._inductor import lowering
    op = torch.ops.mkl._mkl_linear.default
    own = lowering.lowerings.get(op)
    with packed_linear.calls_packed_products():
        assert lowering.lowerings.get(op) is not own
    assert lowering.lowerings.get(op) is own


def test_packs_are_made_for_the_asked_row_count():
    """A pack for another row count than the products' makes mkl::_mkl_linear fall back to the
    unpacked product: the same values, none of the speed."""
    model = tiny_model()
    with torch.no_grad():
        packs = packed_linear.block_packs(model, 10)
    found = [getattr(p, name) for p in packs for name in ('qkv', 'attn_out', 'ff_in', 'ff_out')]
    assert found and all(pack is not None and pack.rows == 10 for pack in found)


def test_only_fp32_weights_are_packed():
    """MKL's packed sgemm is fp32 only: a float64 or bf16 model's products run unpacked (a
    packed attempt raises 'weight's dtype should be float')."""
    for dtype in (torch.float64, torch.bfloat16):
        model = tiny_model().to(dtype)
        with torch.no_grad():
            packs = packed_linear.block_packs(model, 10)
        assert all(getattr(p, name) is None for p in packs for name in ('qkv', 'attn_out', 'ff_in', 'ff_out')), dtype

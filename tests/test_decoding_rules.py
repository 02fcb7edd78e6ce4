"""Rules of the cached decoding core that the step-by-step comparison in test_decoding.py left
open, found by a mutation review of decoding.py, kv_cache.py and masks.prefix_mask:

- a downsampled (U-Net) modality under the options that read the instance's shape (axial
  rotary, ALiBi, modality experts, adaptive conditioning): the commit step must describe the
  transformer-side token grid, not the full-resolution shape;
- the row mapping after several releases (each compaction maps sample rows to the rows of the
  current, already compacted cache), and a row prefilled again after a compaction;
- the cost rules the outputs cannot show: a release is compacted once, at the next step, to
  exactly the live rows, and a step over some rows copies only their visible slots.

Every test drives the cached runner and the uncached reference through the same calls
(`Both`) and compares every answer, or checks the runner's cache against explicit values.
"""
import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import decoding, sampling
from transfusion_pytorch.kv_cache import KVCache

from conftest import tiny_model
from test_decoding import Both
from test_unet import unet_model


def prefill_all(both, prompts):
    for row, items in enumerate(sampling.model_items(both.model, prompts)):
        both.call('prefill', row, items)


def give_adaptive_an_effect(model):
    """The adaptive modulation is zero-initialised; random weights make a wrong one visible."""
    if model.modalities.adaptive is not None:
        for parameter in model.modalities.adaptive.parameters():
            torch.nn.init.normal_(parameter, std = 0.1)
    return model


@pytest.mark.parametrize('options', [
    dict(axial_rotary = True),
    dict(alibi_heads = 1, modality_experts = True, time_conditioning = 'adaptive'),
])
@torch.no_grad()
def test_downsampled_instances_agree_under_options_that_read_the_token_grid(options):
    """Modality 0 of the U-Net model is a 4x6 grid that the transformer sees as 2x3 tokens. The
    velocities (guided and not), the commit of the clean instance and the text after it equal
    the uncached reference's, so the commit step's positions, ALiBi, experts and modulated
    tokens follow the 2x3 token grid (and the end token stays text)."""
    model = give_adaptive_an_effect(unet_model(**options).eval())
    both = Both(model, 2, 96)
    prefill_all(both, [randint(0, 16, (4,)), randint(0, 16, (9,))])
    both.open_instance([0, 1], 0, (4, 6))
    both.instance([0, 1], 0, (4, 6), cfg_scale = 1.)
    both.call('feed', [1, 0], [3, 4])
    both.open_instance([1], 0, (4, 6))
    both.instance([1], 0, (4, 6), cfg_scale = 2.)
    both.call('feed', [0, 1], [5, 6])


@torch.no_grad()
def test_rows_keep_their_cache_through_successive_releases():
    """Four rows at different lengths; row 0 is released, a step compacts the cache (rows 1, 2,
    3 -> cache rows 0, 1, 2); then row 2 is released and the next compaction must take cache
    rows 0 and 2 (rows 1 and 3), not the sample indices. Texts and an instance over the rows
    left (out of order, guided) equal the reference's."""
    model = tiny_model().eval()
    both = Both(model, 4, 96)
    prefill_all(both, [randint(0, 16, (n,)) for n in (3, 5, 8, 2)])
    both.call('feed', [3, 1, 0, 2], [1, 2, 3, 4])
    both.release(0)
    both.call('feed', [2, 3, 1], [5, 6, 7])
    both.release(2)
    both.call('feed', [3, 1], [8, 9])
    both.open_instance([3, 1], 1, (3,))
    both.instance([3, 1], 1, (3,), cfg_scale = 2.)
    both.release(3)
    both.call('feed', [1], [10])
    cached = both.runners[0]
    assert cached.cache.batch == 1 and cached.cache_row == [None, 0, None, None]


@torch.no_grad()
def test_a_row_prefilled_again_after_a_compaction_writes_its_own_cache_row():
    """After row 0 is released and the cache compacted (rows 1, 2 -> cache rows 0, 1), a new
    prompt for row 1 replaces that row's sequence: it goes to cache row 0, so row 1 continues
    from the new prompt and row 2 from its own."""
    model = tiny_model().eval()
    both = Both(model, 3, 64)
    prefill_all(both, [randint(0, 16, (n,)) for n in (4, 6, 3)])
    both.release(0)
    both.call('feed', [1, 2], [1, 2])
    new_prompt, = sampling.model_items(model, [[randint(0, 16, (9,)), (1, randn(2, 4))]])
    both.call('prefill', 1, new_prompt)
    both.call('feed', [2, 1], [3, 4])
    both.call('feed', [1], [5])
    both.call('feed', [2], [6])


@torch.no_grad()
def test_a_release_is_compacted_once_at_the_next_step_to_the_live_rows():
    """release() only marks the row; the next step drops it, keeping the live rows' contents in
    order; later steps without a new release work on that same cache (no copy per step)."""
    model = tiny_model().eval()
    runner = decoding.CachedRunner(model, 3, 64, cuda_graphs = False)
    for row, items in enumerate(sampling.model_items(model, [randint(0, 16, (n,)) for n in (3, 4, 5)])):
        runner.prefill(row, items)
    runner.feed([0, 1, 2], [1, 2, 3])
    full = runner.cache
    live = [tensor[[0, 2]].clone() for tensor in full.tensors()]
    runner.release(1)
    assert runner.cache is full                                    # nothing is copied at release
    runner.feed([0, 2], [4, 5])
    compacted = runner.cache
    assert compacted.batch == 2 and runner.cache_row == [0, None, 1]
    for before, after in zip(live, compacted.tensors()):
        torch.testing.assert_close(after[:, :, :5], before[:, :, :5])   # slots both rows filled before the release
    runner.feed([2, 0], [6, 7])
    runner.feed([0], [8])
    assert runner.cache is compacted


@torch.no_grad()
def test_a_step_over_some_rows_copies_only_their_visible_slots(monkeypatch):
    """With 200 slots and rows under 64 tokens, a step over some of the rows copies those rows'
    first 64 slots (the visible window), not all 200; once a row passes 64 tokens, 128."""
    copies = []
    rows = KVCache.rows
    monkeypatch.setattr(KVCache, 'rows', lambda cache, index, visible = None: copies.append(rows(cache, index, visible).slots) or rows(cache, index, visible))
    model = tiny_model().eval()
    runner = decoding.CachedRunner(model, 2, 200, cuda_graphs = False)
    for row, items in enumerate(sampling.model_items(model, [randint(0, 16, (5,)), randint(0, 16, (61,))])):
        runner.prefill(row, items)
    copies.clear()                                                  # prefill copies whole rows
    runner.feed([0], [1])
    runner.feed([1], [2])                                           # row 1: 62 -> 63 tokens
    runner.feed([1], [3])                                           # 63 -> 64
    runner.feed([1], [4])                                           # 64 -> 65: the next window
    assert runner.lengths == [7, 65]
    assert copies == [64, 64, 64, 128]

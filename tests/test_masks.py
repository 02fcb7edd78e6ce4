"""The attention rule: one rule, rendered as a dense mask and as a flex BlockMask, checked
against a direct token-by-token reading of DESIGN.md's rule."""
import random
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from transfusion_pytorch.attention import attend
from transfusion_pytorch.masks import AttentionMask, AttentionRule, causal_mask, mask_for_rule, prefix_mask


def random_layout(seed: int, samples: int = 3, scale: int = 1):
    """Per-token document, instance (-1 for text-like) and isolated flags of random samples;
    scale multiplies the lengths of text runs and instances."""
    rng = random.Random(seed)
    document, instance, isolated = [], [], []
    next_instance = 0
    for doc in range(samples):
        for _ in range(rng.randint(1, 4)):
            for _ in range(rng.randint(0, 5 * scale)):
                document.append(doc); instance.append(-1); isolated.append(False)
            if rng.random() < 0.7:
                drop = rng.random() < 0.3
                for _ in range(rng.randint(1, 6 * scale)):
                    document.append(doc); instance.append(next_instance); isolated.append(drop)
                next_instance += 1
        document.append(doc); instance.append(-1); isolated.append(False)
    as_tensor = lambda values, dtype: torch.tensor(values, dtype = dtype)
    return as_tensor(document, torch.long), as_tensor(instance, torch.long), as_tensor(isolated, torch.bool)


def reference_rule(document, instance, isolated, bidirectional = True):
    """DESIGN.md section 3 read literally, one pair of tokens at a time."""
    n = len(document)
    allowed = torch.zeros(n, n, dtype = torch.bool)
    for q in range(n):
        for k in range(n):
            same_instance = instance[q] >= 0 and instance[q] == instance[k]
            if document[q] != document[k]:
                continue
            if isolated[q] and not same_instance:
                continue
            allowed[q, k] = k <= q or (bidirectional and same_instance)
    return allowed


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('bidirectional', [True, False])
def test_dense_mask_matches_reference(seed, bidirectional):
    document, instance, isolated = random_layout(seed)
    rule = AttentionRule(document, instance, isolated, bidirectional_instances = bidirectional)
    assert torch.equal(rule.dense(), reference_rule(document.tolist(), instance.tolist(), isolated.tolist(), bidirectional))


@pytest.mark.parametrize('seed', range(3))
def test_flex_mask_mod_matches_dense(seed):
    document, instance, isolated = random_layout(seed, samples = 4)
    rule = AttentionRule(document, instance, isolated)
    n = len(document)
    from_mask_mod = create_mask(rule.mask_mod, None, None, n, n, device = 'cpu')[0, 0]
    assert torch.equal(from_mask_mod, rule.dense())


@pytest.mark.parametrize('seed', range(2))
def test_flex_and_sdpa_attention_agree(seed):
    document, instance, isolated = random_layout(seed, samples = 4)
    rule = AttentionRule(document, instance, isolated)
    n = len(document)
    q, k, v = torch.randn(3, 1, 2, n, 16).unbind(0)
    dense = attend(q, k, v, mask_for_rule(rule, 'sdpa'))
    flex = attend(q, k, v, mask_for_rule(rule, 'flex'))
    torch.testing.assert_close(flex, dense, atol = 1e-5, rtol = 1e-5)


def test_causal_backends_agree():
    q, k, v = torch.randn(3, 2, 2, 70, 16).unbind(0)
    dense = attend(q, k, v, causal_mask(70, q.device, 'sdpa'))
    flex = attend(q, k, v, causal_mask(70, q.device, 'flex'))
    explicit = attend(q, k, v, AttentionMask(dense = torch.ones(70, 70, dtype = torch.bool).tril()))
    torch.testing.assert_close(dense, explicit)
    torch.testing.assert_close(flex, dense, atol = 1e-5, rtol = 1e-5)


def test_prefix_mask_equals_rule_rows():
    """Decoding masks are the rule's rows for the new tokens: an instance of 4 tokens after a
    3-token prefix, then its end token, in a cache of 10 slots."""
    document = torch.zeros(8, dtype = torch.long)
    instance = torch.tensor([-1, -1, -1, 0, 0, 0, 0, -1])
    rule = AttentionRule(document, instance).dense(kv_length = 10)
    mask = prefix_mask(torch.tensor([3]), 5, 10, bidirectional_span = 4).dense[0, 0]
    assert torch.equal(mask, rule[3:8])
    isolated = prefix_mask(torch.tensor([3]), 4, 10, bidirectional_span = 4, isolated = torch.tensor([True])).dense[0, 0]
    expected = AttentionRule(document, instance, isolated = instance >= 0).dense(kv_length = 10)[3:7]
    assert torch.equal(isolated, expected)
    text = prefix_mask(torch.tensor([5]), 1, 10).dense[0, 0, 0]
    assert text.tolist() == [True] * 6 + [False] * 4


@pytest.mark.parametrize('seed', range(3))
def test_block_mask_tiles_match_create_block_mask(seed):
    """Our tile classification equals flex's own create_block_mask on the same rule."""
    document, instance, isolated = random_layout(seed, samples = 12)
    rule = AttentionRule(document, instance, isolated)
    n = len(document)
    ours = rule.block_mask()
    reference = create_block_mask(rule.mask_mod, None, None, n, n, device = 'cpu')
    assert n > 128
    assert torch.equal(ours.to_dense(), reference.to_dense())
    partial_ours = ours.kv_num_blocks.sum().item()
    assert partial_ours == reference.kv_num_blocks.sum().item()
    assert ours.full_kv_num_blocks.sum().item() == reference.full_kv_num_blocks.sum().item()


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('scale', [1, 40], ids = ['short', 'long'])
def test_block_mask_tiles_are_sound_for_any_instance_numbering(seed, bidirectional, scale):
    """Full tiles hold only allowed pairs and every allowed pair lies in a kept tile, so flex
    (rule inside partial tiles) computes exactly the rule; also with instance ids out of
    position order and isolated instances, where the per-tile summaries are loosest."""
    document, instance, isolated = random_layout(seed, samples = 12 if scale == 1 else 3, scale = scale)
    shuffled = torch.randperm(int(instance.max()) + 1, generator = torch.Generator().manual_seed(seed))
    instance = torch.where(instance >= 0, shuffled[instance.clamp(min = 0)], -1)
    rule = AttentionRule(document, instance, isolated, bidirectional_instances = bidirectional)
    n = len(document)
    partial, full = rule._classify_tiles(128)
    to_tokens = lambda tiles: tiles.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :n]
    dense = rule.dense()   # equal to the literal reading of the rule (test_dense_mask_matches_reference)
    assert n > 128 and not (partial & full).any()
    assert torch.equal(to_tokens(full) | (to_tokens(partial) & dense), dense)


@pytest.mark.parametrize('seed', range(3))
def test_sample_by_sample_attention_equals_whole_sequence_attention(seed):
    """The dense backend's per-sample rows (no scores across samples) give the same outputs, and
    the same gradients for queries, keys and values (moved by gathers both ways, not autograd's
    scatter-add), as one dense mask over the whole packed sequence, ALiBi included."""
    from transfusion_pytorch.masks import Segments, alibi_slopes, segmented_mask
    document, instance, isolated = random_layout(seed, samples = 4)
    coords = torch.randint(0, 5, (len(document), 2))
    rule = AttentionRule(document, instance, isolated, coords = coords, alibi_slopes = alibi_slopes(2, 1))
    slices, start = [], 0
    for doc in range(4):
        length = int((document == doc).sum())
        slices.append((start, start + length))
        start += length
    segments = Segments.from_slices(slices, 'cpu')
    q, k, v = torch.randn(3, 1, 2, len(document), 8).unbind(0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    upstream = torch.randn_like(q)
    whole = attend(q, k, v, mask_for_rule(rule, 'sdpa'))
    whole_grads = torch.autograd.grad(whole, (q, k, v), upstream)
    rows = segmented_mask(rule, segments)
    by_sample = segments.scatter(attend(segments.gather(q), segments.gather(k), segments.gather(v), rows))
    torch.testing.assert_close(by_sample, whole, atol = 1e-5, rtol = 1e-5)
    for got, expected in zip(torch.autograd.grad(by_sample, (q, k, v), upstream), whole_grads):
        torch.testing.assert_close(got, expected, atol = 1e-5, rtol = 1e-5)
    assert rows.dense.shape[-1] == max(b - a for a, b in slices) < len(document)


@torch.no_grad()   # flex attention has no CPU backward
@pytest.mark.parametrize('alibi_heads', [0, 1])
def test_flex_attention_serves_many_sequence_lengths_compiled(alibi_heads):
    """Packed batches of 11 lengths (up to 11 flex tiles) match SDPA, and none falls back to
    the unfused flex path that static shapes reached after the recompile limit (with ALiBi on
    CPU, where each length compiles statically, after 8 lengths)."""
    from transfusion_pytorch import Transfusion
    options = dict(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2,), alibi_heads = alibi_heads)
    torch.manual_seed(0)
    dense = Transfusion(**options, transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    flex = Transfusion(**options, transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16, attention_backend = 'flex'))
    flex.load_state_dict(dense.state_dict())
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        for tiles in range(1, 12):
            batch = [[torch.randint(0, 16, (128 * tiles - 10,))], [torch.randint(0, 16, (5,)), torch.randn(2, 8)]]
            times, noise = torch.tensor([.5]), [torch.randn(2, 8)]
            for a, b in zip(dense.predict(batch, times, noise).logits, flex.predict(batch, times, noise).logits):
                torch.testing.assert_close(b, a, atol = 1e-4, rtol = 1e-4)
    assert not [w for w in caught if 'without torch.compile' in str(w.message)], [str(w.message)[:200] for w in caught]


@torch.no_grad()   # flex attention has no CPU backward
def test_flex_attention_has_room_for_the_versions_of_many_models():
    """Models of other head counts add versions to flex_attention's one compiled code object.
    With dynamo's global limit (8 by default, lowered to 1 here to keep the test short), later
    models ran the unfused kernel; the region keeps compile_region's own limit. ALiBi on CPU
    compiles statically, one version per model here."""
    from transfusion_pytorch import Transfusion
    options = dict(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2,), alibi_heads = 1)
    with warnings.catch_warnings(record = True) as caught, torch._dynamo.config.patch(recompile_limit = 1):
        warnings.simplefilter('always')
        for heads in (1, 2):
            torch.manual_seed(0)
            dense = Transfusion(**options, transformer = dict(dim = 32, depth = 1, heads = heads, dim_head = 8))
            flex = Transfusion(**options, transformer = dict(dim = 32, depth = 1, heads = heads, dim_head = 8, attention_backend = 'flex'))
            flex.load_state_dict(dense.state_dict())
            batch = [[torch.randint(0, 16, (50,))], [torch.randint(0, 16, (5,)), torch.randn(2, 8)]]
            times, noise = torch.tensor([.5]), [torch.randn(2, 8)]
            for a, b in zip(dense.predict(batch, times, noise).logits, flex.predict(batch, times, noise).logits):
                torch.testing.assert_close(b, a, atol = 1e-4, rtol = 1e-4)
    assert not [w for w in caught if 'without torch.compile' in str(w.message)], [str(w.message)[:200] for w in caught]


@torch.no_grad()   # flex attention has no CPU backward
def test_flex_inside_compiled_blocks_equals_eager_sdpa():
    """Flex attention compiled inside a block, where its queries and keys are computed in the
    same graph and its values are a strided view of the fused projection (on CPU Inductor got
    that wrong until the inputs were made contiguous: errors of 3 to 9), with ALiBi as a
    score_mod inside the region, gives eager SDPA's predictions."""
    from transfusion_pytorch import Transfusion
    options = dict(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2, 3), alibi_heads = 1)
    torch.manual_seed(0)
    dense = Transfusion(**options, transformer = dict(dim = 32, depth = 2, heads = 2, dim_head = 16))
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.normal_(std = 0.3)
    flex = Transfusion(**options, transformer = dict(dim = 32, depth = 2, heads = 2, dim_head = 16, attention_backend = 'flex', compile_blocks = True))
    flex.load_state_dict(dense.state_dict())
    batch = [[torch.randint(0, 16, (5,)), torch.randn(3, 4, 8)], [torch.randn(2, 3, 8), torch.randint(0, 16, (4,))]]
    times, noise = torch.tensor([.5, .3]), [torch.randn(3, 4, 8), torch.randn(2, 3, 8)]
    expected, compiled = dense.predict(batch, times, noise), flex.predict(batch, times, noise)
    for a, b in zip(expected.velocities + expected.logits, compiled.velocities + compiled.logits):
        torch.testing.assert_close(b, a, atol = 1e-4, rtol = 1e-4)


@torch.no_grad()
def test_laser_on_flex_keeps_packed_samples_apart():
    """LASER shifts values by their max: on the packed flex row it must be each sample's own,
    or a sample with large values would push another's exp(v) into underflow."""
    from transfusion_pytorch import Transfusion
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 16, transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16, laser = True,
                                                                attention_backend = 'flex'))
    block = model.transformer.blocks[0]
    normed = block.attn_norm(model.token_embedding.weight)                          # (v, d)
    target = torch.where(torch.arange(normed.shape[0]) < 8, 48., -48.)            # value channel 0: +-48 by token
    weights = torch.linalg.lstsq(normed.double(), target.double()[:, None]).solution[:, 0].float()
    block.attn.to_qkv.weight[2 * block.attn.to_qkv.weight.shape[0] // 3].copy_(weights)
    high, low = [torch.randint(0, 8, (30,))], [torch.randint(8, 16, (30,))]
    together, alone = model.predict([high, low]).logits[1], model.predict([low]).logits[0]
    torch.testing.assert_close(together, alone, atol = 1e-4, rtol = 1e-4)


def test_prefix_alibi_equals_the_rule_bias_rows():
    """Decoding an instance of a 2x3 grid and its end token after a 4-token prefix, in a cache
    of 12 slots, with two instances in the batch at different starts: the ALiBi bias of each
    row is the whole-sequence rule's bias rows for those tokens (none for the prefix, the end
    token or the empty slots)."""
    from transfusion_pytorch.masks import alibi_slopes, instance_alibi
    from transfusion_pytorch.token_layout import grid_coordinates
    slopes, coords = alibi_slopes(2, 2), grid_coordinates((2, 3), 2)
    bias = prefix_mask(torch.tensor([4, 2]), 7, 12, bidirectional_span = 6, instance_bias = instance_alibi(coords, slopes)).bias
    for row, start in enumerate((4, 2)):
        instance = torch.tensor([-1] * start + [0] * 6 + [-1])
        full_coords = torch.zeros(start + 7, 2, dtype = torch.long)
        full_coords[start:start + 6] = coords
        rule = AttentionRule(torch.zeros(start + 7, dtype = torch.long), instance, coords = full_coords, alibi_slopes = slopes)
        torch.testing.assert_close(bias[row], rule.dense_bias(kv_length = 12)[:, start:])


def test_flex_padding_is_a_causal_document_of_its_own():
    """A packed batch on the flex backend is padded to whole tiles; the pad tokens form their own
    causal document (-1), so the BlockMask is the rule over the padded tokens, read literally,
    and keeps no more tiles than flex's own create_block_mask of that rule."""
    from conftest import mixed_batch, tiny_model
    from transfusion_pytorch.token_layout import packed_transformer_inputs
    model = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'flex'))
    packed = model.pack(mixed_batch() * 6)
    _, mask, _, instance, pad = packed_transformer_inputs(model, packed, None, None)
    n = packed.length
    assert pad == -n % 128 > 0 and n > 2 * 128
    document = torch.cat((packed.document, torch.full((pad,), -1)))
    assert torch.equal(mask.document, document) and torch.equal(instance[:n], packed.instance) and (instance[n:] == -1).all()
    expected = reference_rule(document.tolist(), instance.tolist(), [False] * (n + pad))
    assert torch.equal(create_mask(mask.block.mask_mod, None, None, n + pad, n + pad, device = 'cpu')[0, 0], expected)
    reference = create_block_mask(mask.block.mask_mod, None, None, n + pad, n + pad, device = 'cpu')
    assert torch.equal(mask.block.kv_num_blocks, reference.kv_num_blocks)
    assert torch.equal(mask.block.full_kv_num_blocks, reference.full_kv_num_blocks)


def test_torch_func_grad_of_a_packed_batch_equals_autograd():
    """Several samples attend one row per sample (Segments), whose gather and scatter are an
    autograd.Function: torch.func.grad through it gives autograd's gradients."""
    from torch.func import functional_call, grad
    from conftest import tiny_model
    torch.manual_seed(0)
    model = tiny_model()
    batch = [[torch.randint(0, 16, (5,)), torch.randn(2, 3, 8)], [torch.randint(0, 16, (3,))], [(1, torch.randn(4, 4)), torch.randint(0, 16, (2,))]]
    draws = dict(times = torch.rand(2), noise = [torch.randn(2, 3, 8), torch.randn(4, 4)])
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = grad(lambda p: functional_call(model, p, (batch,), draws))(params)
    model(batch, **draws).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol = 1e-6, rtol = 1e-5, msg = name)

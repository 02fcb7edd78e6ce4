"""Roadmap options on positions and weights: N-d ALiBi inside modalities, 1-D and axial rotary,
mixture of experts by modality. Each test checks the claim itself, not only that it runs."""
import math

import pytest
import torch
from torch import randint, randn

from transfusion_pytorch.attention import attend
from transfusion_pytorch.config import TransformerConfig
from transfusion_pytorch.experts import ExpertLinear
from transfusion_pytorch.masks import AttentionMask, AttentionRule, alibi_slopes, mask_for_rule
from transfusion_pytorch.positions import RotaryEmbedding, apply_rotary
from transfusion_pytorch.token_layout import grid_coordinates
from transfusion_pytorch.transformer import Transformer

from conftest import mixed_batch, tiny_model
from test_sampling import assert_samples_equal

QUIET = dict(show_progress = False)


# N-d ALiBi

def grid_rule(shape = (3, 4), text = 2, alibi_heads = 2, heads = 4):
    """One sample: `text` text tokens then one instance of `shape`."""
    count = math.prod(shape)
    n = text + count
    instance = torch.tensor([-1] * text + [0] * count)
    coords = torch.zeros(n, len(shape), dtype = torch.long)
    coords[text:] = grid_coordinates(shape, len(shape))
    return AttentionRule(torch.zeros(n, dtype = torch.long), instance, coords = coords, alibi_slopes = alibi_slopes(heads, alibi_heads)), text


def test_alibi_bias_falls_with_grid_distance_on_chosen_heads():
    rule, text = grid_rule()
    bias = rule.dense_bias()                                          # (h, n, n)
    slopes = alibi_slopes(4, 2)
    coords = grid_coordinates((3, 4), 2).float()
    expected = -slopes[:2, None, None] * torch.cdist(coords, coords)
    torch.testing.assert_close(bias[:2, text:, text:], expected)
    assert (bias[2:] == 0).all(), 'heads without ALiBi get no bias'
    assert (bias[:, :text] == 0).all() and (bias[:, :, :text] == 0).all(), 'text pairs get no bias'
    # farther on the grid = lower bias: (0,0)->(0,1) vs (0,0)->(2,3)
    assert bias[0, text, text + 1] > bias[0, text, text + 11]


def test_alibi_attention_weights_follow_the_bias():
    """With equal raw scores (q = 0), attention inside the instance is softmax(-slope * distance)."""
    rule, text = grid_rule()
    n = rule.length
    q, k = torch.zeros(1, 4, n, n), torch.randn(1, 4, n, n)
    v = torch.eye(n).expand(1, 4, n, n)                               # output row = attention weights
    weights = attend(q, k, v, mask_for_rule(rule, 'sdpa'))[0]
    query = text + 5
    visible = rule.dense()[query]
    expected = torch.softmax(rule.dense_bias()[:, query].masked_fill(~visible, float('-inf')), dim = -1)
    torch.testing.assert_close(weights[:, query], expected)


@torch.no_grad()  # flex attention has no CPU backward
def test_alibi_dense_and_flex_agree():
    """Also at a second padded length: on CPU, Inductor's flex kernel with a score_mod did not
    compile once torch.compile made the length dynamic."""
    model = tiny_model(alibi_heads = 1, transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'sdpa'))
    flex = tiny_model(alibi_heads = 1, transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'flex'))
    flex.load_state_dict(model.state_dict())
    for text in (3, 200):
        batch = [[randint(0, 16, (text,)), randn(2, 3, 8)], *mixed_batch()[1:]]
        times, noise = torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
        a, b = model.predict(batch, times, noise), flex.predict(batch, times, noise)
        for x, y in zip(a.logits + a.velocities, b.logits + b.velocities):
            torch.testing.assert_close(x, y, atol = 1e-4, rtol = 1e-4)
    plain = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.predict(batch, times, noise).velocities[0], a.velocities[0]), 'ALiBi changed nothing'


# rotary

@pytest.mark.parametrize('components', [None, 3])
def test_rotary_scores_are_invariant_to_shifting_the_whole_sequence(components):
    rotary = RotaryEmbedding(48)
    q, k = torch.randn(2, 1, 2, 10, 48).unbind(0)
    positions = torch.randint(0, 50, (1, 10) if components is None else (1, 10, components))
    def scores(offset):
        cos, sin = rotary(positions + offset)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)
    torch.testing.assert_close(scores(0), scores(1000), atol = 1e-3, rtol = 1e-4)
    cos, sin = rotary(positions)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol = 1e-3), 'rotation did nothing'


def test_axial_rotary_of_equal_components_is_1d_rotary():
    rotary = RotaryEmbedding(48)
    positions = torch.arange(12)[None]
    one_d = rotary(positions)
    axial = rotary(positions[..., None].expand(1, 12, 3))
    torch.testing.assert_close(axial[0], one_d[0])
    torch.testing.assert_close(axial[1], one_d[1])


@pytest.mark.parametrize('components', [None, 3])
def test_transformer_output_is_invariant_to_shifting_positions(components):
    """Relative positions only: shifting every position of a sequence changes nothing."""
    transformer = Transformer(TransformerConfig(dim = 48, depth = 2, heads = 2, dim_head = 24))
    x = torch.randn(1, 9, 48)
    positions = torch.arange(9)[None] if components is None else torch.randint(0, 9, (1, 9, components))
    mask = AttentionMask(is_causal = True)
    torch.testing.assert_close(transformer(x, positions, mask), transformer(x, positions + 37, mask), atol = 1e-4, rtol = 1e-4)


def test_axial_rotary_distinguishes_grid_offsets_that_raster_order_confuses():
    """In a 3x4 grid, (0,3)->(1,0) and (0,0)->(0,1) are both 1 apart in raster order; axially they
    differ, so the attention score between them differs."""
    config = tiny_model(axial_rotary = True).config
    from transfusion_pytorch.token_layout import step_positions
    positions = step_positions(config, torch.tensor([5]), 12, (3, 4))[0]            # (12, 3)
    assert positions[0].tolist() == [5, 5, 5] and positions[3].tolist() == [5, 5, 8] and positions[4].tolist() == [5, 6, 5]
    rotary = RotaryEmbedding(32)
    q = k = torch.randn(1, 1, 1, 32).expand(1, 1, 12, 32)
    cos, sin = rotary(positions[None])
    scores = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)
    assert not torch.isclose(scores[0, 0, 3, 4], scores[0, 0, 0, 1])


@pytest.mark.parametrize('options', [dict(axial_rotary = True), dict(alibi_heads = 1), dict(modality_experts = True),
                                     dict(axial_rotary = True, alibi_heads = 2, modality_experts = True, causal_modality_attention = True)])
def test_options_keep_cached_sampling_exact(options):
    model = tiny_model(**options)
    kwargs = dict(max_length = 60, text_temperature = 0., force_modality_at_start = 0, modality_steps = 3, seed = 1, cfg_scale = 2., **QUIET)
    prompt = [randint(0, 16, (3,)), (1, randn(3, 4))]
    assert_samples_equal(model.sample(prompt, cache_kv = True, **kwargs), model.sample(prompt, cache_kv = False, **kwargs))


# mixture of experts by modality

def expert_rows(model):
    """Record how many token rows each expert linear of the first block's FF input receives."""
    seen = {}
    layer = model.transformer.blocks[0].ff.to_hidden
    for index, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda module, args, out, index = index: seen.__setitem__(index, seen.get(index, 0) + args[0].shape[0]))
    return seen


def test_modality_experts_route_every_token_to_its_own_weights():
    model = tiny_model(modality_experts = True)
    assert isinstance(model.transformer.blocks[0].attn.to_qkv, ExpertLinear) and len(model.transformer.blocks[0].attn.to_qkv.experts) == 3
    seen = expert_rows(model)
    packed = model.pack(mixed_batch())
    model(mixed_batch())
    latents = {g.modality: g.index.shape[0] for g in packed.groups}
    assert seen == {0: packed.length - sum(latents.values()), 1: latents[0], 2: latents[1]}


def test_text_tokens_use_only_the_text_expert():
    model = tiny_model(modality_experts = True)
    model(randint(0, 16, (2, 12))).backward()
    for name, p in model.transformer.named_parameters():
        if '.experts.1.' in name or '.experts.2.' in name:
            assert p.grad is None or not p.grad.any(), f'{name} received gradient from text alone'
        elif '.experts.0.' in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_modality_experts_train_with_gradients_on_present_experts():
    model = tiny_model(modality_experts = True)
    model([[randint(0, 16, (4,)), randn(2, 3, 8)]]).backward()    # modality 1 absent
    grads = {name: p.grad for name, p in model.transformer.named_parameters() if '.experts.' in name}
    assert all(g is not None for g in grads.values()), 'every expert weight must get a gradient (zero if unused), for DDP'
    assert all(g.abs().sum() > 0 for name, g in grads.items() if '.experts.1.' in name)
    assert all(not g.any() for name, g in grads.items() if '.experts.2.' in name)


@pytest.mark.parametrize('experts', [1, 2], ids = ['linear', 'expert_linear'])
def test_compiled_cpu_projections_add_the_bias_apart_with_eager_values(experts):
    """Traced for a CPU, a biased projection is a bias-free product plus an add (which Inductor
    fuses into the next element-wise kernel, instead of addmm's copy of the bias): in fp32 it
    gives eager's outputs and gradients; under bf16 autocast eager's dtype, and its values up
    to the product's one extra rounding."""
    from transfusion_pytorch import experts as experts_module
    from transfusion_pytorch.experts import Routing
    layer = experts_module.linear(8, 6, experts)
    routing = Routing([(0, torch.tensor([0, 2, 3])), (1, torch.tensor([1, 4, 5]))]) if experts == 2 else None
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward

    def project(x):
        return experts_module.apply(layer, x, routing)

    x = randn(2, 3, 8, requires_grad = True)
    torch._dynamo.reset()
    out = torch.compile(project, backend = record, fullgraph = True)(x)
    expected = project(x)
    torch.testing.assert_close(out, expected)
    for grad, grad_expected in zip(torch.autograd.grad(out.sum(), (x, *layer.parameters())),
                                   torch.autograd.grad(expected.sum(), (x, *layer.parameters()))):
        torch.testing.assert_close(grad, grad_expected)
    linears = [node for node in graphs[-1].nodes if node.target is torch._C._nn.linear]
    assert linears and all(len(node.args) == 2 and node.kwargs.get('bias') is None for node in linears)

    with torch.autocast('cpu', dtype = torch.bfloat16):
        out = torch.compile(project, backend = record, fullgraph = True)(x)
        expected = project(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol = 2 ** -8, rtol = 2 ** -7)
    linears = [node for node in graphs[-1].nodes if node.target is torch._C._nn.linear]
    assert linears and all(len(node.args) == 2 and node.kwargs.get('bias') is None for node in linears)


def test_expert_linear_under_autocast_returns_what_each_expert_returns():
    """Each token's row is its expert's nn.Linear output, in that output's dtype (bf16 under
    autocast), not the fp32 of the input."""
    from transfusion_pytorch.experts import ExpertLinear, Routing
    layer = ExpertLinear(8, 6, 2)
    routing = Routing([(0, torch.tensor([0, 2, 3])), (1, torch.tensor([1, 4, 5]))])
    x = randn(2, 3, 8)
    with torch.autocast('cpu', dtype = torch.bfloat16):
        out = layer(x, routing).reshape(6, 6)
        flat = x.reshape(6, 8)
        for expert, index in routing.groups:
            expected = layer.experts[expert](flat[index])
            assert out.dtype == expected.dtype == torch.bfloat16
            assert torch.equal(out[index], expected)


def test_packed_axial_positions_of_every_instance():
    """Axial positions in a packed batch: text-like tokens (p, p, p); the latents of every
    instance (the first, instance 0, included) (o, o + c_1, o + c_2), o the position of the
    instance's first latent in its sample, c raster-order grid coordinates with missing trailing
    axes 0 (the 1-axis modality's coordinate is c_1)."""
    import itertools
    from transfusion_pytorch.token_layout import packed_coordinates, packed_positions
    model = tiny_model(axial_rotary = True)
    batch = [[torch.randint(0, 16, (3,)), randn(2, 3, 8), torch.randint(0, 16, (2,)), (1, randn(3, 4))], [(1, randn(2, 4))]]
    packed = model.pack(batch)
    shapes = [(2, 3), (3, 1), (2, 1)]                            # instance grids, missing axes as 1
    expected = []
    for n, (p, i) in enumerate(zip(packed.positions.tolist(), packed.instance.tolist())):
        if i < 0:
            expected.append([p] * 3)
            continue
        start = packed.instance_starts[i]
        o = packed.positions[start].item()
        c = list(itertools.product(*(range(a) for a in shapes[i])))[n - start]
        expected.append([o, o + c[0], o + c[1]])
    positions = packed_positions(model.config, packed, packed_coordinates(model.config, packed))
    assert positions.tolist() == expected


def test_grid_coordinates_are_raster_order_with_missing_trailing_axes_zero():
    assert grid_coordinates((2, 3), 2).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_coordinates((3,), 3).tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]


# the packed layout, read off the documented form token by token

def reference_layout(vocab, batch):
    """The packed layout of batch.py's docstring, written out one token at a time:
    BOS text begin shape-tokens latents end text ... EOS per sample, samples back to back.
    Items are (modality, latent) or text ids; latent slots hold 0. Returns per-token lists and
    per-instance facts."""
    LATENT = None
    tokens, positions, document, instance, starts, followed, latents = [], [], [], [], [], [], {}
    count = 0
    for s, sample in enumerate(batch):
        row = [(vocab.bos, -1)]
        for j, item in enumerate(sample):
            if not isinstance(item, tuple):
                row += [(int(t), -1) for t in item]
                continue
            modality, latent = item
            shape = tuple(latent.shape[:-1])
            digits = []
            for a, axis in enumerate(shape):
                digits += ([vocab.axis_separator] if a else []) + [vocab.digits[int(c)] for c in str(axis)]
            row += [(vocab.begin[modality], -1)] + [(t, -1) for t in digits + [vocab.shape_end]]
            starts.append(len(tokens) + len(row))
            row += [(LATENT, count)] * math.prod(shape) + [(vocab.end[modality], -1)]
            followed.append(any(not isinstance(later, tuple) and later.numel() > 0 for later in sample[j + 1:]))
            latents.setdefault(modality, []).append((count, latent))
            count += 1
        row.append((vocab.eos, -1))
        tokens += [t for t, _ in row]
        instance += [i for _, i in row]
        positions += list(range(len(row)))
        document += [s] * len(row)
    return tokens, positions, document, instance, starts, followed, latents


def test_packing_matches_the_documented_layout_token_by_token():
    """Every per-token array of a packed batch against the layout written out by hand: positions
    restart at 0 in every sample, instances are numbered in order across the batch, a modality
    followed only by another modality or by empty text is not 'followed by text', and the text
    loss predicts each text, begin, shape and EOS token from the token before it."""
    model = tiny_model()
    vocab = model.vocab
    empty = torch.zeros(0, dtype = torch.long)
    batch = [
        [(1, randn(12, 4)), randint(0, 16, (3,)), (0, randn(2, 3, 8)), empty],
        [randint(0, 16, (2,)), (0, randn(1, 2, 8)), (1, randn(3, 4)), randint(0, 16, (4,))],
        [(0, randn(2, 2, 8)), empty, (1, randn(2, 4))],
    ]
    packed = model.pack(batch)
    tokens, positions, document, instance, starts, followed, latents = reference_layout(vocab, batch)
    assert packed.token_ids.tolist() == [0 if t is None else t for t in tokens]
    assert packed.positions.tolist() == positions
    assert packed.document.tolist() == document
    assert packed.instance.tolist() == instance
    assert packed.instance_starts == starts
    assert packed.instance_followed_by_text.tolist() == followed == [True, False, True, True, False, False]
    assert packed.sample_slices == [(document.index(s), len(document) - document[::-1].index(s)) for s in range(3)]
    targets = [p for p, t in enumerate(tokens) if t is not None and t != vocab.bos and t not in vocab.end]
    assert packed.loss_index.tolist() == [p - 1 for p in targets]
    assert packed.loss_targets.tolist() == [tokens[p] for p in targets]
    assert [g.modality for g in packed.groups] == [0, 1]
    for group in packed.groups:
        owned = latents[group.modality]
        assert group.index.tolist() == [p for p, i in enumerate(instance) if i in {k for k, _ in owned}]
        assert group.instance.tolist() == [instance[p] for p in group.index.tolist()]
        torch.testing.assert_close(group.data, torch.cat([x.reshape(-1, x.shape[-1]) for _, x in owned]))


def test_alibi_slopes_are_the_documented_geometric_sequence_on_the_first_heads():
    """Press et al.: slope_i = 2^(-8 i / a) for i = 1..a on the first a heads, 0 on the rest."""
    assert alibi_slopes(6, 4).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 0, 0]
    assert alibi_slopes(2, 1).tolist() == [2 ** -8, 0]
    assert alibi_slopes(3, 0).tolist() == [0, 0, 0]


def test_cached_step_alibi_equals_the_packed_bias_among_an_instances_latents():
    """The bias a cached decoding step applies inside an instance of each shape is the packed
    rule's bias among that instance's latents (same grid, same axis order)."""
    from transfusion_pytorch.token_layout import packed_transformer_inputs, step_alibi
    model = tiny_model(alibi_heads = 2)
    for item, shape in (((0, randn(2, 3, 8)), (2, 3)), ((0, randn(3, 2, 8)), (3, 2)), ((1, randn(4, 4)), (4,))):
        packed = model.pack([[randint(0, 16, (2,)), item]])
        _, mask, _, _, _ = packed_transformer_inputs(model, packed, None, None)
        latents = packed.groups[0].index
        torch.testing.assert_close(step_alibi(model, shape), mask.bias[0][:, latents][:, :, latents])


def test_packed_routing_sends_every_token_once_pads_to_the_text_expert():
    """Experts by token type over a flex-padded sequence: every slot exactly once, text-like
    tokens and pads to expert 0, latents of modality m to 1 + m (also when modality 0 is absent)."""
    from transfusion_pytorch.token_layout import packed_routing
    model = tiny_model(modality_experts = True)
    for batch in (mixed_batch(), [[randint(0, 16, (3,)), (1, randn(3, 4))]]):
        packed = model.pack(batch)
        padded = packed.length + 5
        expert = torch.full((padded,), -1)
        for index, indices in packed_routing(model.config, packed, padded).groups:
            assert (expert[indices] == -1).all(), 'a token routed twice'
            expert[indices] = index
        modality = torch.tensor(packed.instance_modality)[packed.instance.clamp(min = 0)]
        assert torch.equal(expert[:packed.length], torch.where(packed.instance >= 0, 1 + modality, 0))
        assert (expert[packed.length:] == 0).all()


def test_alibi_changes_nothing_in_a_batch_without_modalities():
    """ALiBi acts only inside instances: on text-only samples the model equals one without it."""
    model, plain = tiny_model(alibi_heads = 1), tiny_model()
    plain.load_state_dict(model.state_dict())
    batch = [[randint(0, 16, (5,))], [randint(0, 16, (3,))]]
    torch.testing.assert_close(model(batch), plain(batch))


def test_axial_coordinates_of_a_downsampled_modality_are_on_its_token_grid():
    """With a U-Net (modality_downsample = 2) the transformer sees a (4, 6) instance as a (2, 3)
    grid of tokens: its axial coordinates are that grid's, in raster order."""
    from transfusion_pytorch.token_layout import packed_coordinates
    model = tiny_model(axial_rotary = True, modality_downsample = 2, modality_default_shape = ((2, 4), (4,)))
    packed = model.pack([[randint(0, 16, (2,)), randn(4, 6, 8)]])
    start = packed.instance_starts[0]
    coordinates = packed_coordinates(model.config, packed)
    assert coordinates[start:start + 6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert (packed.instance >= 0).sum() == 6 and not coordinates[packed.instance < 0].any()

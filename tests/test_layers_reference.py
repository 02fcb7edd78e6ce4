"""More layers against hand-written references, from a mutation review of attention.py,
transformer.py, experts.py and modality.py: each test pins a behaviour that a small change to
those files could break while the rest of the suite still passed (the feed-forward's gate, the
norms' eps and which norm feeds what, dropout in every path, the stack's wiring of value
residuals and per-block modulation, LASER's value shift, expert routing, the time embedding's
MLP, frozen coders in eval mode, and per-instance results of batching instances by shape)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, randn

from transfusion_pytorch.config import TransformerConfig
from transfusion_pytorch.masks import AttentionMask
from transfusion_pytorch.positions import RotaryEmbedding


def rms(x, gain):
    """RMSNorm by hand: x / sqrt(mean(x^2) + eps) * (1 + gain), eps the dtype's machine epsilon."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim = True) + torch.finfo(x.dtype).eps) * (1 + gain)


def randomise_(module):
    """Give every parameter (norm gains and zero-initialised projections included) random values,
    so that no two parts coincide as they do at initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std = 0.5)
    return module


# feed-forward

@pytest.mark.parametrize('pad_multiple', [1, 8], ids = ['plain', 'padded'])
@torch.no_grad()
def test_feed_forward_is_swiglu_with_the_second_half_as_the_gate(pad_multiple):
    """to_hidden's output splits into (value, gate), first half value: out = to_out(value *
    silu(gate)); the padded computation is the same function of the same weights."""
    from transfusion_pytorch.transformer import FeedForward
    ff = FeedForward(16, 10, pad_multiple = pad_multiple)
    assert bool(ff.pad) == (pad_multiple > 1)
    x = randn(2, 5, 16)
    value, gate = ff.to_hidden(x).chunk(2, dim = -1)
    torch.testing.assert_close(ff(x), ff.to_out(value * F.silu(gate)))


@torch.no_grad()
def test_feed_forward_with_experts_ignores_the_padding():
    """Padding is for one expert only: with experts, pad_multiple leaves the routed computation
    exactly that of an unpadded feed-forward with the same weights."""
    from transfusion_pytorch.experts import Routing
    from transfusion_pytorch.transformer import FeedForward
    padded, plain = FeedForward(16, 10, experts = 2, pad_multiple = 8), FeedForward(16, 10, experts = 2)
    plain.load_state_dict(padded.state_dict())
    x, routing = randn(2, 3, 16), Routing([(0, torch.tensor([0, 1, 4])), (1, torch.tensor([2, 3, 5]))])
    torch.testing.assert_close(padded(x, routing), plain(x, routing))


@pytest.mark.parametrize('dim_hidden, pad_multiple, pad', [(10, 8, 6), (12, 8, 4), (16, 8, 0), (5, 16, 11)])
def test_feed_forward_pads_the_hidden_width_up_to_the_next_multiple(dim_hidden, pad_multiple, pad):
    """The padded width is the smallest multiple of pad_multiple at or above dim_hidden."""
    from transfusion_pytorch.transformer import FeedForward
    assert FeedForward(16, dim_hidden, pad_multiple = pad_multiple).pad == pad


@pytest.mark.parametrize('pad_multiple', [1, 8], ids = ['plain', 'padded'])
def test_feed_forward_dropout_acts_on_the_hidden_units_in_training_only(pad_multiple):
    """With p = 1 every hidden unit is dropped in training, so only to_out's bias is left; in
    eval the same module computes the full function. Both computations (plain and padded)."""
    from transfusion_pytorch.transformer import FeedForward
    ff = FeedForward(16, 10, dropout = 1., pad_multiple = pad_multiple)
    x = randn(2, 5, 16)
    torch.testing.assert_close(ff.train()(x), ff.to_out.bias.expand(2, 5, 16))
    value, gate = ff.to_hidden(x).chunk(2, dim = -1)
    torch.testing.assert_close(ff.eval()(x), ff.to_out(value * F.silu(gate)))


# norms and the block

def test_rms_norm_uses_the_dtypes_epsilon_and_the_gain_offset():
    """Inputs of small norm show the eps: it must be the dtype's machine epsilon (F.rms_norm's
    default), not a larger constant."""
    from transfusion_pytorch.transformer import RMSNorm
    norm = randomise_(RMSNorm(8))
    x = randn(3, 8) * 1e-3
    torch.testing.assert_close(norm(x), rms(x, norm.gain))


@torch.no_grad()
def test_block_normalises_attention_and_feed_forward_inputs_with_their_own_norms():
    """With trained-like (different) gains, attention reads attn_norm(x) and the feed-forward
    ff_norm(x + attention): at initialisation both gains are zero and would hide a swap."""
    from transfusion_pytorch.transformer import Block
    block = randomise_(Block(TransformerConfig(dim = 16, depth = 1, heads = 2, dim_head = 8), is_first = True))
    x = randn(1, 5, 16)
    rotary, mask = RotaryEmbedding(8)(torch.arange(5)[None]), AttentionMask(is_causal = True)
    out, _ = block(x, rotary, mask)
    h = x + block.attn(rms(x, block.attn_norm.gain), rotary, mask)[0]
    torch.testing.assert_close(out, h + block.ff(rms(h, block.ff_norm.gain)), atol = 1e-5, rtol = 1e-5)


@torch.no_grad()
def test_stack_feeds_every_block_its_own_modulation_and_the_first_blocks_values():
    """Transformer.forward at depth 3 equals the blocks called by hand: block l gets
    modulations[l], every block after the first mixes in block 0's values (not the previous
    block's: at depth 2 the two coincide), and the final norm closes the stack."""
    from transfusion_pytorch.transformer import Modulation, Transformer
    config = TransformerConfig(dim = 16, depth = 3, heads = 2, dim_head = 8, value_residual = True)
    transformer = randomise_(Transformer(config)).eval()
    x, positions = randn(1, 6, 16), torch.arange(6)[None]
    modulations = [Modulation(*(randn(1, 6, 16) * 0.3 for _ in range(6))) for _ in range(3)]
    mask = AttentionMask(is_causal = True)
    out = transformer(x, positions, mask, modulations = modulations, compiled = False)

    rotary = transformer.rotary(positions)
    h, first_values = transformer.blocks[0](x, rotary, mask, modulation = modulations[0])
    for block, modulation in zip(transformer.blocks[1:], modulations[1:]):
        h, _ = block(h, rotary, mask, first_values = first_values, modulation = modulation)
    torch.testing.assert_close(out, transformer.final_norm(h))


def test_only_blocks_after_the_first_have_a_value_mixing_gate():
    """The first block's values are what the others mix in: it has no gate of its own (one
    would be a parameter without gradient, which DDP refuses)."""
    from transfusion_pytorch.transformer import Transformer
    transformer = Transformer(TransformerConfig(dim = 16, depth = 3, heads = 2, dim_head = 8, value_residual = True))
    assert [block.attn.to_value_mix is not None for block in transformer.blocks] == [False, True, True]


@torch.no_grad()
def test_qk_norm_gains_are_per_head():
    """HeadRMSNorm normalises each head's vectors with that head's own gain: changing head 0's
    gain leaves head 1 exactly as it was."""
    from transfusion_pytorch.attention import HeadRMSNorm
    norm = randomise_(HeadRMSNorm(heads = 2, dim_head = 4))
    x = randn(1, 2, 3, 4)
    before = norm(x)
    torch.testing.assert_close(before, rms(x, norm.gain), atol = 1e-6, rtol = 1e-5)
    norm.gain[0] += 1.
    after = norm(x)
    assert torch.equal(after[:, 1], before[:, 1]) and not torch.allclose(after[:, 0], before[:, 0])


def test_qk_norm_option_reaches_every_block():
    """transformer.qk_norm gives every block's attention its query and key norms (and only then)."""
    from transfusion_pytorch.transformer import Transformer
    for qk_norm in (False, True):
        transformer = Transformer(TransformerConfig(dim = 16, depth = 2, heads = 2, dim_head = 8, qk_norm = qk_norm))
        assert all((b.attn.q_norm is not None) == (b.attn.k_norm is not None) == qk_norm for b in transformer.blocks)


# attention dropout

def test_attention_dropout_applies_in_training_only():
    """Training draws a dropout mask: the same seed gives the same output, which differs from
    eval's; eval equals a model built without dropout."""
    from transfusion_pytorch.attention import Attention
    attn = Attention(dim = 16, heads = 2, dim_head = 8, dropout = 0.5)
    x, rotary, mask = randn(1, 6, 16), RotaryEmbedding(8)(torch.arange(6)[None]), AttentionMask(is_causal = True)
    torch.manual_seed(1)
    first = attn.train()(x, rotary, mask)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(attn(x, rotary, mask)[0], first)
    evaluated = attn.eval()(x, rotary, mask)[0]
    assert not torch.allclose(first, evaluated)
    plain = Attention(dim = 16, heads = 2, dim_head = 8)
    plain.load_state_dict(attn.state_dict())
    torch.testing.assert_close(evaluated, plain(x, rotary, mask)[0])


@torch.no_grad()
def test_attention_dropout_zeroes_units_of_the_heads_output():
    """Dropout acts on the heads' output Float['b n (h e)'] before the output projection (not on
    the attention weights, which flex attention cannot drop): the training output is to_out of
    eval's heads output times the mask F.dropout draws on ones of that shape under the same seed."""
    from transfusion_pytorch.attention import Attention
    attn = Attention(dim = 16, heads = 2, dim_head = 8, dropout = 0.5)
    x, rotary, mask = randn(1, 6, 16), RotaryEmbedding(8)(torch.arange(6)[None]), AttentionMask(is_causal = True)
    heads = []
    attn.to_out.register_forward_pre_hook(lambda module, args: heads.append(args[0]))
    attn.eval()(x, rotary, mask)
    torch.manual_seed(3)
    trained = attn.train()(x, rotary, mask)[0]
    torch.manual_seed(3)
    kept = F.dropout(torch.ones(1, 6, 16), 0.5, True)
    torch.testing.assert_close(trained, attn.to_out(heads[0] * kept))


@torch.no_grad()   # flex attention has no CPU backward
def test_attention_dropout_is_the_same_on_flex_and_sdpa():
    """The same seed draws the same dropout on both backends (a packed row of three samples):
    one config trains one model whichever backend runs it."""
    from transfusion_pytorch.attention import Attention
    from transfusion_pytorch.masks import AttentionRule, mask_for_rule
    document = torch.tensor([0] * 40 + [1] * 50 + [2] * 38)
    instance = torch.where((torch.arange(128) % 40) < 10, document, -1)
    rule = AttentionRule(document, instance, bidirectional_instances = True)
    attn = randomise_(Attention(dim = 32, heads = 2, dim_head = 16, dropout = 0.3)).train()
    x, rotary = randn(1, 128, 32), RotaryEmbedding(16)(torch.arange(128)[None])
    outputs = []
    for backend in ('flex', 'sdpa'):
        torch.manual_seed(5)
        outputs.append(attn(x, rotary, mask_for_rule(rule, backend, sample_slices = [(0, 40), (40, 90), (90, 128)]))[0])
    torch.testing.assert_close(outputs[0], outputs[1], atol = 1e-4, rtol = 1e-4)
    torch.manual_seed(6)
    assert not torch.allclose(attn(x, rotary, mask_for_rule(rule, 'sdpa'))[0], outputs[1])   # another draw differs


# LASER

def laser_reference(q, k, v, visible):
    """log(softmax(q k^T / sqrt(e)) exp(v)) in float64, where exp(v) does not overflow."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float('-inf'))
    return (scores.softmax(dim = -1) @ v.exp()).log()


def test_laser_equals_log_attention_of_exp_values_beyond_float32_range():
    """Values around 120 (exp overflows float32): the per-channel max shift keeps the output
    equal to the float64 formula. A key hidden from every query, with a large value (an
    unwritten cache slot), must not set the shift, or every visible exp(v) would underflow."""
    from transfusion_pytorch.attention import laser_attend
    q, k = randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    v = randn(2, 2, 5, 8) * 3 + 120
    v[..., 4, :] = 400.
    visible = torch.ones(5, 5).tril().bool()
    visible[:, 4] = False
    visible = visible.expand(2, 1, 5, 5)
    out = laser_attend(q, k, v, AttentionMask(dense = visible))
    expected = laser_reference(q, k, v, visible)
    torch.testing.assert_close(out.double(), expected, atol = 1e-4, rtol = 1e-5)


def test_laser_on_a_packed_row_shifts_each_sample_by_its_own_max():
    """A packed row (document ids) of two samples whose values sit at +100 and -100: each must
    be shifted by its own sample's max, or the low sample's exp(v) underflows to zero."""
    from transfusion_pytorch.attention import laser_attend
    document = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    visible = (document[:, None] == document[None]) & torch.ones(7, 7).tril().bool()
    q, k = randn(1, 2, 7, 8), randn(1, 2, 7, 8)
    v = randn(1, 2, 7, 8) + torch.where(document == 0, 100., -100.)[:, None]
    out = laser_attend(q, k, v, AttentionMask(dense = visible[None, None], document = document))
    torch.testing.assert_close(out.double(), laser_reference(q, k, v, visible), atol = 1e-4, rtol = 1e-5)


def test_laser_output_stays_finite_where_a_query_sees_only_underflowing_values():
    """Query 0 sees only key 0, 200 below the sample's max in channel 0: exp underflows to zero
    and the output is clamped to log(tiny) + max instead of -inf (whose gradient is NaN)."""
    from transfusion_pytorch.attention import laser_attend
    q, k = randn(1, 1, 2, 4), randn(1, 1, 2, 4)
    v = torch.zeros(1, 1, 2, 4, requires_grad = True)
    shifted = v + torch.tensor([[-100., 0., 0., 0.], [100., 0., 0., 0.]])
    out = laser_attend(q, k, shifted, AttentionMask(is_causal = True))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(math.log(torch.finfo(torch.float32).tiny) + 100.))
    out.sum().backward()
    assert torch.isfinite(v.grad).all()


# experts

@pytest.mark.parametrize('experts', [1, 2, 3])
@pytest.mark.parametrize('bias', [True, False])
def test_expert_linear_is_one_linear_per_expert_with_the_asked_bias(experts, bias):
    """One expert is a plain nn.Linear (checkpoint names unchanged); two or more (a single
    modality's experts included) are separate weights; bias=False holds for every expert."""
    from transfusion_pytorch import experts as experts_module
    layer = experts_module.linear(8, 6, experts, bias = bias)
    linears = [layer] if experts == 1 else list(layer.experts)
    assert isinstance(layer, nn.Linear) == (experts == 1) and len(linears) == experts
    assert all((linear.bias is not None) == bias for linear in linears)


@torch.no_grad()
def test_expert_linear_gives_each_token_its_experts_output():
    """Routed by groups of flattened token indices, token i gets experts[e_i](x_i); without a
    routing every token is text (expert 0)."""
    from transfusion_pytorch.experts import ExpertLinear, Routing
    layer = ExpertLinear(8, 6, experts = 3)
    x = randn(2, 4, 8)
    expert_of = torch.tensor([0, 2, 1, 2, 1, 0, 0, 2])
    routing = Routing([(e, (expert_of == e).nonzero().flatten()) for e in (2, 0, 1)])
    expected = torch.stack([layer.experts[e](row) for e, row in zip(expert_of.tolist(), x.reshape(8, 8))])
    torch.testing.assert_close(layer(x, routing), expected.reshape(2, 4, 6))
    torch.testing.assert_close(layer(x, None), layer.experts[0](x))
    torch.testing.assert_close(layer(x, Routing.single(2)), layer.experts[2](x))


# modality parts

@torch.no_grad()
def test_time_embedding_mlp_is_linear_silu_linear():
    """The sinusoidal features go through Linear, SiLU, Linear."""
    from transfusion_pytorch.modality import TimeEmbedding
    embedding = TimeEmbedding(16)
    times = torch.tensor([0., 0.3, 1.])
    angles = 1000. * times[:, None] * embedding.frequencies
    features = torch.cat((angles.sin(), angles.cos()), dim = -1)
    first, _, second = embedding.mlp
    torch.testing.assert_close(embedding(times), second(F.silu(first(features))))


def test_fresh_adaptive_conditioning_modulates_nothing():
    """Zero-initialised, a fresh model's adaptive conditioning is the identity: every
    modulation of every block is exactly zero, whatever the time embedding."""
    from transfusion_pytorch.modality import AdaptiveConditioning
    blocks = AdaptiveConditioning(8, depth = 2).per_block(randn(3, 8), torch.tensor([[0, 1, 2, -1]]))
    assert len(blocks) == 2
    assert all(not getattr(m, name).any() for m in blocks for name in ('attn_scale', 'attn_shift', 'attn_gate', 'ff_scale', 'ff_shift', 'ff_gate'))


@pytest.mark.parametrize('train_encoders', [False, True], ids = ['frozen_encoder', 'trainable_encoder'])
def test_decoders_and_frozen_encoders_run_in_eval_mode_without_grad(train_encoders):
    """A decoder (always frozen) and a frozen encoder run in eval mode under no_grad, so their
    dropout does nothing and nothing is recorded; a trainable encoder runs as the model does."""
    from transfusion_pytorch import Transfusion
    coder = lambda: nn.Sequential(nn.Dropout(0.5), nn.Conv1d(4, 4, 1))
    model = Transfusion(num_text_tokens = 16, dim_latent = 4, modality_default_shape = (3,), channel_first_latent = True,
                        modality_encoder = coder(), modality_decoder = coder(), train_modality_encoders = train_encoders,
                        transformer = dict(dim = 16, depth = 1, heads = 1, dim_head = 16)).train()
    modalities, data = model.modalities, randn(1, 4, 3)
    assert not any(p.requires_grad for p in modalities.decoders.parameters())
    assert all(p.requires_grad == train_encoders for p in modalities.encoders.parameters())
    decoded = modalities.decode(0, data)
    assert decoded.grad_fn is None and modalities.decoders[0].training
    torch.testing.assert_close(decoded, modalities.decoders[0][1](data))
    encoded = modalities.encode(0, [(0, 0, data[0])])[0]
    if train_encoders:
        assert encoded.grad_fn is not None
    else:
        assert encoded.grad_fn is None and modalities.encoders[0].training
        torch.testing.assert_close(encoded, modalities.encoders[0][1](data)[0])


@torch.no_grad()
def test_encode_batches_equal_shapes_and_returns_each_instance_its_own_latent():
    """Instances are encoded in batches of equal shape, and every entry gets back the encoding
    of its own data, in the order given."""
    from transfusion_pytorch import Transfusion
    encoder = nn.Conv1d(2, 4, 1)
    model = Transfusion(num_text_tokens = 16, dim_latent = 4, modality_default_shape = (3,), channel_first_latent = True,
                        modality_encoder = encoder, transformer = dict(dim = 16, depth = 1, heads = 1, dim_head = 16))
    data = [randn(2, 3), randn(2, 5), randn(2, 3), randn(2, 3)]
    encoded = model.modalities.encode(0, [(i, 0, x) for i, x in enumerate(data)])
    for latent, x in zip(encoded, data):
        torch.testing.assert_close(latent, encoder(x[None])[0])


@torch.no_grad()
def test_downsampled_groups_equal_each_instance_alone():
    """With a U-Net, a modality's packed instances are run batched by shape: embed_group and
    velocity_group must give every instance what it gets run alone, in packed order, with
    shapes interleaved (A, B, A)."""
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 16, dim_latent = 4, modality_default_shape = (4, 6), modality_downsample = 2,
                        transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    modalities = model.modalities
    shapes = [(4, 6), (2, 4), (4, 6)]
    inputs = [randn(math.prod(shape), 4) for shape in shapes]
    hidden = [randn(math.prod(shape) // 4, 32) for shape in shapes]
    embedded = modalities.embed_group(0, torch.cat(inputs), shapes, 0.)
    velocities = modalities.velocity_group(0, torch.cat(hidden), torch.cat(inputs), shapes)
    torch.testing.assert_close(embedded, torch.cat([modalities.embed(0, x[None], s, 0.)[0] for x, s in zip(inputs, shapes)]))
    expected = [modalities.velocity(0, h[None], x[None], s)[0] for h, x, s in zip(hidden, inputs, shapes)]
    torch.testing.assert_close(velocities, torch.cat(expected))

"""Layers against their formulas written out by hand: rotary (1-D and axial), attention with qk
norm and value residual, a block's adaptive modulation, skip merges, the latent U-Net, the
time embedding and adaptive conditioning."""
import math

import torch
import torch.nn.functional as F
from torch import randn


def test_rotary_rotates_each_half_pair_by_position_times_theta_frequency():
    """Exact RoPE (Su et al.): channel j and j + e/2 form a complex number rotated by
    p * theta^(-2j/e), counter-clockwise; position 0 is the identity."""
    from transfusion_pytorch.positions import RotaryEmbedding, apply_rotary
    dim, theta = 8, 100.
    positions = torch.tensor([[0, 1, 3, 10]])
    x = randn(1, 2, 4, dim)
    out = apply_rotary(x, *RotaryEmbedding(dim, theta)(positions))
    frequencies = theta ** (-torch.arange(0, dim, 2).double() / dim)
    angle = positions[0, :, None].double() * frequencies                          # (n, e/2)
    z = torch.complex(x[..., :dim // 2].double(), x[..., dim // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(out, torch.cat((z.real, z.imag), dim = -1).float(), atol = 1e-5, rtol = 1e-5)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])


def test_transformer_rotary_uses_the_configured_theta():
    from transfusion_pytorch.config import TransformerConfig
    from transfusion_pytorch.transformer import Transformer
    transformer = Transformer(TransformerConfig(dim = 16, depth = 1, heads = 1, dim_head = 8, rotary_theta = 100.))
    cos, sin = transformer.rotary(torch.tensor([[1]]))
    torch.testing.assert_close(torch.atan2(sin, cos).flatten(), 100. ** -(torch.arange(0, 8, 2) / 8))


def test_axial_rotary_gives_each_component_a_contiguous_section_highest_frequencies_first():
    """With k components, the e/2 frequencies are split into k contiguous sections: frequency f
    is rotated by component f * k // (e/2) (component 0, the sequence position, takes the highest)."""
    from transfusion_pytorch.positions import RotaryEmbedding
    rotary = RotaryEmbedding(12)                                  # 6 frequencies, 3 components: 2 each
    positions = torch.tensor([[[2, 5, 7]]])
    cos, sin = rotary(positions)
    component = torch.tensor([2, 2, 5, 5, 7, 7]).float()
    expected = component * rotary.inv_freq
    torch.testing.assert_close(cos.flatten(), expected.cos())
    torch.testing.assert_close(sin.flatten(), expected.sin())


def reference_attention(attn, x, positions, first_values = None):
    """Attention.forward rebuilt by hand: qk RMSNorm (gain 1 + g) BEFORE rotary, the first layer's
    values mixed in with weight sigmoid(to_value_mix(x)), causal SDPA, output projection."""
    from einops import rearrange
    from transfusion_pytorch.positions import RotaryEmbedding, apply_rotary
    q, k, v = rearrange(attn.to_qkv(x), 'b n (three h e) -> three b h n e', three = 3, h = attn.heads)
    if first_values is not None:
        gate = rearrange(torch.sigmoid(attn.to_value_mix(x)), 'b n h -> b h n 1')
        v = (1 - gate) * v + gate * first_values
    rms = lambda t, g: t * torch.rsqrt(t.pow(2).mean(-1, keepdim = True) + torch.finfo(t.dtype).eps) * (1 + g)
    q, k = rms(q, attn.q_norm.gain), rms(k, attn.k_norm.gain)
    cos, sin = RotaryEmbedding(q.shape[-1])(positions)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal = True)
    return attn.to_out(rearrange(out, 'b h n e -> b n (h e)'))


@torch.no_grad()
def test_attention_with_qk_norm_and_value_residual_equals_the_reference():
    """With trained-like (nonzero) norm gains the order of norm and rotary matters, and the gate
    must weigh the FIRST layer's values (zero-initialised gains hide both at init)."""
    from transfusion_pytorch.attention import Attention
    from transfusion_pytorch.masks import AttentionMask
    from transfusion_pytorch.positions import RotaryEmbedding
    attn = Attention(dim = 16, heads = 2, dim_head = 8, qk_norm = True, value_residual = True)
    for gain in (attn.q_norm.gain, attn.k_norm.gain):
        gain.normal_()
    attn.to_value_mix.bias.fill_(1.5)                          # gates well away from 1/2
    x, first_values = randn(2, 6, 16), randn(2, 2, 6, 8)
    positions = torch.arange(6)[None]
    out, _ = attn(x, RotaryEmbedding(8)(positions), AttentionMask(is_causal = True), first_values = first_values)
    torch.testing.assert_close(out, reference_attention(attn, x, positions, first_values), atol = 1e-5, rtol = 1e-5)


@torch.no_grad()
def test_block_applies_each_modulation_where_documented():
    """Block with random per-token modulation equals the adaLN formulas: attention input
    norm * (1 + attn_scale) + attn_shift, output * (1 + attn_gate), and the ff_* counterparts."""
    from transfusion_pytorch.config import TransformerConfig
    from transfusion_pytorch.masks import AttentionMask
    from transfusion_pytorch.positions import RotaryEmbedding
    from transfusion_pytorch.transformer import Block, Modulation
    block = Block(TransformerConfig(dim = 16, depth = 1, heads = 2, dim_head = 8), is_first = True)
    x = randn(1, 5, 16)
    rotary, mask = RotaryEmbedding(8)(torch.arange(5)[None]), AttentionMask(is_causal = True)
    m = Modulation(*(randn(1, 5, 16) * 0.5 for _ in range(6)))
    out, _ = block(x, rotary, mask, modulation = m)
    h = x + block.attn(block.attn_norm(x) * (1 + m.attn_scale) + m.attn_shift, rotary, mask)[0] * (1 + m.attn_gate)
    expected = h + block.ff(block.ff_norm(h) * (1 + m.ff_scale) + m.ff_shift) * (1 + m.ff_gate)
    torch.testing.assert_close(out, expected)


def test_a_fresh_skip_merge_passes_x_through():
    """U-ViT skips start as the identity on x (the skip enters with zero weight)."""
    from transfusion_pytorch.transformer import SkipMerge
    x, skip = randn(2, 5, 16), randn(2, 5, 16)
    torch.testing.assert_close(SkipMerge(16)(x, skip), x)


def identity_unet(shape):
    """A 2-axis U-Net whose down and up projections are the identity (d = factor^A * u): the
    tokens are the skip features space-to-depth'd, and decode must put them back in place."""
    from transfusion_pytorch.unet import LatentUNet
    unet = LatentUNet(dim_latent = 3, dim_model = 4 * 5, factor = 2, axes = len(shape), dim_hidden = 5)
    with torch.no_grad():
        for layer in (unet.down, unet.up):
            layer.weight.copy_(torch.eye(20))
            layer.bias.zero_()
    return unet


@torch.no_grad()
def test_unet_decode_inverts_encode_position_by_position():
    """depth-to-space is the inverse of space-to-depth: through identity projections the
    upsampled features equal the skip at every position, so decode = head([skip, skip])."""
    shape = (4, 6)
    unet = identity_unet(shape)
    x = randn(2, math.prod(shape), 3)
    tokens, skip = unet.encode(x, shape)
    torch.testing.assert_close(unet.decode(tokens, skip, shape), unet.head(torch.cat((skip, skip), dim = -1)))


@torch.no_grad()
def test_unet_skip_reaches_the_output_at_its_own_position():
    """The long skip: changing the skip features at one position changes the velocity there
    and nowhere else (the head is per-position)."""
    from transfusion_pytorch.unet import LatentUNet
    shape = (4, 6)
    unet = LatentUNet(dim_latent = 3, dim_model = 16, factor = 2, axes = 2)
    tokens, skip = unet.encode(randn(1, 24, 3), shape)
    changed = skip.clone()
    changed[0, 17] += 1.
    difference = (unet.decode(tokens, changed, shape) - unet.decode(tokens, skip, shape)).abs().sum(-1)[0]
    assert difference.nonzero().flatten().tolist() == [17]


@torch.no_grad()
def test_time_embedding_features_are_sin_then_cos_of_1000_t_times_geometric_frequencies():
    """The MLP sees [sin(1000 t f_i), cos(1000 t f_i)], f_i = 10000^(-i/F), i < F (F = 128)."""
    from transfusion_pytorch.modality import TimeEmbedding
    embedding = TimeEmbedding(16)
    seen = []
    embedding.mlp[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    times = torch.tensor([0., 0.3, 1.])
    embedding(times)
    frequencies = 10_000. ** (-torch.arange(128).double() / 128)
    angles = 1000. * times.double()[:, None] * frequencies
    torch.testing.assert_close(seen[0].double(), torch.cat((angles.sin(), angles.cos()), dim = -1), atol = 1e-4, rtol = 1e-4)


def test_frequency_tables_stay_fp32_when_the_model_is_cast_or_rebuilt_on_a_device():
    """model.to(bf16) would round the rotary and time frequencies and the ALiBi slopes (3 ALiBi
    heads: slopes 2^(-8/3), ... are not powers of two), so that a bf16 model and its fp32 reload
    would compute different angles and biases; the tables are rebuilt in fp32 instead."""
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, alibi_heads = 3, transformer = dict(dim = 32, depth = 1, heads = 4, dim_head = 16))
    tables = {name: value.clone() for name, value in model.named_buffers() if 'freq' in name or 'slopes' in name}
    assert sorted(tables) == ['alibi.slopes', 'modalities.time_embedding.frequencies', 'transformer.rotary.inv_freq']
    assert not torch.equal(tables['alibi.slopes'], tables['alibi.slopes'].bfloat16().float())   # a cast would round them
    model.to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, value in model.named_buffers():
        if name in tables:
            assert value.dtype == torch.float32 and torch.equal(value, tables[name]), name
    model.to('meta').to_empty(device = 'cpu')      # to_empty leaves buffers uninitialised; tables are rebuilt
    assert all(torch.equal(dict(model.named_buffers())[name], value) for name, value in tables.items())


@torch.no_grad()
def test_adaptive_conditioning_scatters_each_instances_parameters_and_zeros_to_text():
    """Block l's modulation for a token of instance i is the l-th slice of proj(silu(emb_i)),
    split into (attn_scale, attn_shift, attn_gate, ff_scale, ff_shift, ff_gate); -1 gets zeros."""
    from transfusion_pytorch.modality import AdaptiveConditioning
    dim, depth = 4, 2
    adaptive = AdaptiveConditioning(dim, depth)
    torch.nn.init.normal_(adaptive.proj.weight)
    torch.nn.init.normal_(adaptive.proj.bias)
    embedding = randn(3, dim)
    token_instance = torch.tensor([[-1, 0, 2, 0, 1, -1]])
    blocks = adaptive.per_block(embedding, token_instance)
    params = adaptive.proj(F.silu(embedding)).reshape(3, depth, 6, dim)
    names = ('attn_scale', 'attn_shift', 'attn_gate', 'ff_scale', 'ff_shift', 'ff_gate')
    for layer, modulation in enumerate(blocks):
        for j, name in enumerate(names):
            value = getattr(modulation, name)[0]
            for n, i in enumerate(token_instance[0].tolist()):
                torch.testing.assert_close(value[n], params[i, layer, j] if i >= 0 else torch.zeros(dim))


@torch.no_grad()
def test_time_embedding_is_added_to_the_tokens_of_a_downsampled_modality():
    """With a U-Net (modality_downsample) the time embedding is still added to every latent
    token, in the packed path (embed_group) and the decoding path (embed)."""
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 16, dim_latent = 4, modality_default_shape = (4, 6), modality_downsample = 2,
                        transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    modalities = model.modalities
    inputs, shapes = randn(2 * 24, 4), [(4, 6), (4, 6)]
    token_time = randn(2 * 6, 32)
    difference = modalities.embed_group(0, inputs, shapes, token_time) - modalities.embed_group(0, inputs, shapes, 0.)
    torch.testing.assert_close(difference, token_time)
    batched = inputs.reshape(2, 24, 4)
    difference = modalities.embed(0, batched, (4, 6), token_time.reshape(2, 6, 32)) - modalities.embed(0, batched, (4, 6), 0.)
    torch.testing.assert_close(difference, token_time.reshape(2, 6, 32))


@torch.no_grad()
def test_time_embedding_is_added_to_the_tokens_of_a_plain_modality():
    """Without a U-Net each latent token is proj_in(latent) + its instance's time embedding, in
    the packed path (embed_group) and the decoding path (embed); before this test only a
    parameter-has-gradient check in training noticed the embedding missing."""
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 16, dim_latent = 4, modality_default_shape = (3,),
                        transformer = dict(dim = 32, depth = 1, heads = 2, dim_head = 16))
    modalities, proj_in = model.modalities, model.modalities.projections[0].proj_in
    inputs, token_time = randn(5, 4), randn(5, 32)
    torch.testing.assert_close(modalities.embed_group(0, inputs, [(2,), (3,)], token_time), proj_in(inputs) + token_time)
    batched, batched_time = inputs[:4].reshape(2, 2, 4), token_time[:4].reshape(2, 2, 32)
    torch.testing.assert_close(modalities.embed(0, batched, (2,), batched_time), proj_in(batched) + batched_time)

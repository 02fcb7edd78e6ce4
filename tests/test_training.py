"""Interleaved multimodal training: the README contract, the attention rule through the whole
model, packing, loss scale and learning."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn, randint, randn

from transfusion_pytorch import Transfusion, objective
from transfusion_pytorch.masks import AttentionRule

from conftest import mixed_batch, tiny_model


def assert_gradients_on_used_parameters(model, frozen = ()):
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and not any(name.startswith(f) for f in frozen) and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_readme_one_modality():
    model = Transfusion(num_text_tokens = 256, dim_latent = 384, modality_default_shape = (4,), transformer = dict(dim = 64, depth = 2))
    loss = model([
        [randint(0, 256, (16,)), randn(4, 384), randint(0, 256, (8,)), randn(6, 384)],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), randn(2, 384), randint(0, 256, (9,))],
    ])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert_gradients_on_used_parameters(model)


def test_readme_multiple_modalities():
    model = Transfusion(num_text_tokens = 256, dim_latent = (384, 192), modality_default_shape = ((4,), (2,)), transformer = dict(dim = 64, depth = 2))
    loss, parts = model([
        [randint(0, 256, (16,)), (0, randn(4, 384)), randint(0, 256, (8,)), (1, randn(6, 192))],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), (1, randn(2, 192)), randint(0, 256, (9,))],
    ], return_breakdown = True)
    loss.backward()
    assert set(parts.flow_per_modality) == {0, 1}
    assert_gradients_on_used_parameters(model)


def test_readme_encoder_decoder():
    encoder, decoder = nn.Conv2d(3, 384, 3, padding = 1), nn.Conv2d(384, 3, 3, padding = 1)
    model = Transfusion(num_text_tokens = 12, dim_latent = 384, channel_first_latent = True, modality_default_shape = (4, 4),
                        modality_encoder = encoder, modality_decoder = decoder, transformer = dict(dim = 64, depth = 2))
    encoder_before = encoder.weight.clone()
    loss = model([
        [randint(0, 12, (16,)), randn(3, 8, 8), randint(0, 12, (8,)), randn(3, 7, 7)],
        [randint(0, 12, (16,)), randn(3, 8, 5), randint(0, 12, (5,)), randn(3, 2, 16), randint(0, 12, (9,))],
    ])
    loss.backward()
    assert_gradients_on_used_parameters(model)
    assert encoder.weight.grad is None and torch.equal(encoder.weight, encoder_before)  # frozen by default


def test_trainable_encoder_gets_gradients():
    encoder = nn.Conv2d(3, 8, 1)
    model = tiny_model(dim_latent = 8, modality_default_shape = (2, 2), channel_first_latent = True,
                       modality_encoder = encoder, train_modality_encoders = True)
    model([[randn(3, 2, 2), randint(0, 16, (3,))]]).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_trainable_coders_all_get_a_gradient_for_ddp():
    """DDP without find_unused_parameters needs a gradient on every trainable parameter at every
    step: an absent modality's encoder is used by no loss in this batch, so it is anchored into
    the loss. Decoders run only in sampling: they stay frozen, so AdamW's weight decay cannot
    shrink them either."""
    model = tiny_model(channel_first_latent = True, modality_encoder = (nn.Conv2d(3, 8, 1), nn.Conv1d(2, 4, 1)),
                       modality_decoder = (nn.Conv2d(8, 3, 1), nn.Conv1d(4, 2, 1)), train_modality_encoders = True)
    for batch in ([[randn(3, 2, 3), randint(0, 16, (3,))]], randint(0, 16, (2, 6))):
        model.zero_grad(set_to_none = True)
        model(batch).backward()
        assert not [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not any(p.requires_grad for p in model.modalities.decoders.parameters())
    assert all(p.requires_grad for p in model.modalities.encoders.parameters())


def dependency_matrix(model, batch):
    """dep[i, j]: output i (hidden state) has a nonzero gradient w.r.t. input token j."""
    packed = model.pack(batch)
    n = packed.length
    embedding = model.token_embedding(packed.token_ids).detach().requires_grad_()
    inputs = [g.data.clone().requires_grad_() for g in packed.groups]
    original = model.token_embedding.forward
    model.token_embedding.forward = lambda _: embedding
    try:
        hidden = model.packed_hidden(packed, inputs, torch.full((packed.num_instances,), 0.5))
    finally:
        model.token_embedding.forward = original
    depends = torch.zeros(n, n, dtype = torch.bool)
    for i in range(n):
        grads = torch.autograd.grad(hidden[i].sum(), [embedding, *inputs], retain_graph = True, allow_unused = True)
        row = grads[0].abs().sum(-1) > 0
        for group, grad in zip(packed.groups, grads[1:]):
            if grad is not None:
                row[group.index] = grad.abs().sum(-1) > 0
        depends[i] = row
    return packed, depends


def test_attention_rule_by_autograd_on_a_mixed_batch():
    model = tiny_model()
    packed, depends = dependency_matrix(model, mixed_batch())
    expected = AttentionRule(packed.document, packed.instance).dense()
    assert torch.equal(depends, expected)
    # the rule's consequences, stated directly
    latent = packed.instance >= 0
    later = torch.ones_like(depends).triu(1)
    assert not (depends & later)[~latent].any(), 'a text-like token depends on a later token'
    same_instance = (packed.instance[:, None] == packed.instance[None]) & latent[:, None]
    assert depends[same_instance].all(), 'latent tokens of one instance must see each other both ways'
    other_sample = packed.document[:, None] != packed.document[None]
    assert not depends[other_sample].any(), 'a token depends on another sample'


@torch.no_grad()  # flex attention has no CPU backward
def test_dense_and_flex_agree_on_mixed_batches():
    model = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'sdpa'))
    flex = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, attention_backend = 'flex'))
    flex.load_state_dict(model.state_dict())
    batch = mixed_batch()
    times = torch.rand(3)
    noise = [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    a, b = model.predict(batch, times, noise), flex.predict(batch, times, noise)
    for x, y in zip(a.logits + a.velocities, b.logits + b.velocities):
        torch.testing.assert_close(x, y, atol = 1e-4, rtol = 1e-4)


def test_packed_batch_equals_samples_one_by_one():
    model = tiny_model().eval()
    batch = mixed_batch()
    times = torch.rand(3)
    noise = [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    packed = model.predict(batch, times, noise)
    instance = 0
    for s, sample in enumerate(batch):
        count = sum(1 for item in sample if isinstance(item, tuple) or item.is_floating_point())
        alone = model.predict([sample], times[instance:instance + count], noise[instance:instance + count])
        torch.testing.assert_close(packed.logits[s], alone.logits[0], atol = 1e-5, rtol = 1e-5)
        for v_packed, v_alone in zip(packed.velocities[instance:instance + count], alone.velocities):
            torch.testing.assert_close(v_packed, v_alone, atol = 1e-5, rtol = 1e-5)
        instance += count


def test_flow_loss_scale_does_not_grow_with_dim_latent():
    def flow_loss(dim_latent):
        values = []
        for seed in range(4):
            torch.manual_seed(seed)
            model = Transfusion(num_text_tokens = 8, dim_latent = dim_latent, modality_default_shape = (6,), transformer = dict(dim = 64, depth = 1))
            _, parts = model([[randint(0, 8, (3,)), randn(6, dim_latent)]] * 4, return_breakdown = True)
            values.append(parts.flow.item())
        return sum(values) / len(values)
    small, large = flow_loss(4), flow_loss(256)
    assert 0.7 < large / small < 1.4, (small, large)


def test_breakdown_adds_up():
    model = tiny_model(text_loss_weight = 0.7, flow_loss_weight = 2.0, modality_loss_weight = (1.0, 3.0))
    loss, parts = model(mixed_batch(), return_breakdown = True)
    flow = (parts.flow_per_modality[0] + 3 * parts.flow_per_modality[1]) / 4
    torch.testing.assert_close(parts.flow, flow)
    torch.testing.assert_close(loss, 0.7 * parts.text + 2.0 * parts.flow)


def test_tiny_model_overfits_a_mixed_batch():
    model = tiny_model()
    batch = mixed_batch()
    times, noise = torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    first = None
    for _ in range(250):
        _, parts = model(batch, times = times, noise = noise, return_breakdown = True)
        first = first or (parts.text.item(), parts.flow.item())
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
    assert parts.text.item() < 0.1 * first[0], (first, parts.text.item())
    assert parts.flow.item() < 0.1 * first[1], (first, parts.flow.item())


def test_modality_only_training():
    model = tiny_model()
    loss, parts = model(randn(3, 5, 4), modality_type = 1, return_breakdown = True)
    loss.backward()
    assert set(parts.flow_per_modality) == {1} and torch.isfinite(loss)


def test_zero_axis_modality_is_one_token():
    model = Transfusion(num_text_tokens = 8, dim_latent = 6, modality_default_shape = (), transformer = dict(dim = 32, depth = 1))
    packed = model.pack([[randint(0, 8, (2,)), randn(6)]])
    assert (packed.instance >= 0).sum() == 1
    assert torch.isfinite(model([[randint(0, 8, (2,)), randn(6)], [randn(6)]]))


@pytest.mark.parametrize('option', [
    dict(time_conditioning = 'adaptive'), dict(time_sampling = 'logit_normal'), dict(noise_limit_before_text = True),
    dict(condition_dropout = 0.5), dict(causal_modality_attention = True), dict(add_modality_shape_tokens = False),
])
def test_multimodal_options_train_with_gradients_everywhere(option):
    model = tiny_model(**option)
    batch = mixed_batch() if option != dict(add_modality_shape_tokens = False) else [
        [randint(0, 16, (3,)), randn(2, 3, 8), (1, randn(3, 4)), randint(0, 16, (2,))]]
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert_gradients_on_used_parameters(model)


def test_noise_limiting_draws_captioned_images_from_the_cleaner_half():
    model = tiny_model(noise_limit_before_text = True)
    packed = model.pack([[randn(2, 3, 8), randint(0, 16, (4,))], [randint(0, 16, (4,)), randn(2, 3, 8)]] * 50)
    times, _, _ = objective.draw(model, packed, None, None)
    followed = packed.instance_followed_by_text
    assert followed.sum() == 50 and (times[followed] >= 0.5).all()
    assert (times[~followed] < 0.5).any()


def test_condition_dropout_isolates_whole_instances():
    model = tiny_model(condition_dropout = 0.5)
    packed = model.pack(mixed_batch() * 10)
    _, _, isolated = objective.draw(model, packed, None, None)
    assert not isolated[packed.instance < 0].any()
    for i in range(packed.num_instances):
        flags = isolated[packed.instance == i]
        assert flags.all() or not flags.any()
    assert 0 < isolated.sum() < (packed.instance >= 0).sum()


def test_padded_feed_forward_computes_the_same_model():
    """ff_pad_multiple only changes how the feed-forward is computed: the same weights give the
    same loss and the same gradients, and the parameters keep their shapes."""
    plain = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32))
    padded = tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, ff_pad_multiple = 16))
    assert plain.config.transformer.dim_ff % 16 and padded.transformer.blocks[0].ff.pad > 0
    padded.load_state_dict(plain.state_dict())
    batch, times, noise = mixed_batch(), torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    losses = []
    for model in (plain, padded):
        losses.append(model(batch, times = times, noise = noise))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(plain.named_parameters(), padded.parameters()):
        assert a.shape == b.shape
        torch.testing.assert_close(b.grad, a.grad, atol = 1e-6, rtol = 1e-5, msg = lambda m: f'{name}: {m}')


def test_compile_options_reach_inductor_and_keep_the_gradients():
    """compile_blocks with compile_options={'cpp_wrapper': True}: inductor really compiles the
    blocks (C++ kernels behind a C++ launch wrapper) and the loss and gradients stay eager's."""
    transformer = dict(dim = 32, depth = 2, heads = 2, dim_head = 16)
    eager = tiny_model(transformer = transformer)
    fast = tiny_model(transformer = dict(transformer, compile_blocks = True, compile_options = {'cpp_wrapper': True}))
    fast.load_state_dict(eager.state_dict())
    batch, times, noise = mixed_batch(), torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    torch._dynamo.reset()
    losses = []
    for model in (eager, fast):
        losses.append(model(batch, times = times, noise = noise))
        losses[-1].backward()
    assert fast.transformer._compiled_blocks is not None
    torch.testing.assert_close(losses[1], losses[0], atol = 1e-5, rtol = 1e-5)
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol = 1e-5, rtol = 1e-4, msg = lambda m: f'{name}: {m}')


def test_text_loss_is_next_token_ce_over_the_documented_targets():
    """The text loss, rebuilt by hand from predict(): cross-entropy of each token's logits
    against the next token, where that token is text, a begin, a shape token or EOS (not an
    end token, BOS or a latent)."""
    model = tiny_model().eval()
    batch, times, noise = mixed_batch(), torch.rand(3), [randn(2, 3, 8), randn(4, 4), randn(1, 2, 8)]
    pred = model.predict(batch, times, noise)
    _, parts = model(batch, times = times, noise = noise, return_breakdown = True)
    vocab = model.vocab
    logits, targets = [], []
    for sample_logits, ids in zip(pred.logits, pred.token_ids):
        for j in range(len(ids) - 1):
            following = int(ids[j + 1])
            if following >= 0 and following != vocab.bos and following not in vocab.end:   # latents are -1
                logits.append(sample_logits[j])
                targets.append(following)
    expected = F.cross_entropy(torch.stack(logits), torch.tensor(targets))
    torch.testing.assert_close(parts.text, expected)


def test_condition_dropout_cuts_the_instance_off_its_context():
    """An instance whose condition is dropped sees only itself: with (almost) every instance
    dropped, changing the text before it leaves its flow loss unchanged."""
    model = tiny_model(condition_dropout = 0.999).train()
    times, noise = torch.tensor([.4]), [randn(2, 3, 8)]
    image = randn(2, 3, 8)
    flows = []
    for text in (randint(0, 16, (5,)), randint(0, 16, (2,))):
        torch.manual_seed(0)
        _, parts = model([[text, image]], times = times, noise = noise, return_breakdown = True)
        flows.append(parts.flow)
    torch.testing.assert_close(flows[0], flows[1])


def test_text_only_loss_carries_the_text_loss_weight():
    """A text-only batch's total is text_loss_weight times its cross-entropy, as in mixed batches."""
    plain, weighted = tiny_model(), tiny_model(text_loss_weight = 0.25)
    weighted.load_state_dict(plain.state_dict())
    ids = randint(0, 16, (2, 7))
    loss, parts = weighted(ids, return_breakdown = True)
    torch.testing.assert_close(parts.text, plain(ids))
    torch.testing.assert_close(loss, 0.25 * plain(ids))


def test_text_only_batches_need_two_ids_inside_the_vocabulary():
    model = tiny_model()
    with pytest.raises(ValueError, match = r'n >= 2, got \(1, 1\)'):
        model(torch.tensor([[3]]))
    for ids in ([[16, 1, 2]], [[1, 2, 16]]):                       # num_text_tokens itself, as input or as target
        with pytest.raises(ValueError, match = 'sample 0, item 0: text id 16'):
            model(torch.tensor(ids))


def test_caller_given_times_are_used_as_given():
    """Noise limiting shapes drawn times only: given times, a model that limits noise computes
    the same loss as one that does not, the end points 0 (noise) and 1 (data) included."""
    plain, limiting = tiny_model().train(), tiny_model(noise_limit_before_text = True).train()
    limiting.load_state_dict(plain.state_dict())
    batch = [[randn(2, 3, 8), randint(0, 16, (4,))], [randint(0, 16, (3,)), (1, randn(3, 4)), randint(0, 16, (2,))]]
    assert limiting.pack(batch).instance_followed_by_text.all()
    noise = [randn(2, 3, 8), randn(3, 4)]
    for times in ([0., 1.], [1., 0.], [.2, .3]):
        expected = plain(batch, times = times, noise = noise)
        torch.testing.assert_close(limiting(batch, times = times, noise = noise), expected)
    pred = plain.predict(batch, [0., 1.], noise)
    assert torch.equal(pred.noised[0], noise[0]) and torch.equal(pred.noised[1], batch[1][1][1])


def test_eval_mode_draws_neither_limit_noise_nor_drop_conditions():
    """Out of training, times are drawn unlimited and no condition is dropped, whatever the
    training options: under one seed predict and the loss are exactly a plain model's."""
    plain, options = tiny_model().eval(), tiny_model(noise_limit_before_text = True, condition_dropout = 0.999).eval()
    options.load_state_dict(plain.state_dict())
    batch = [[randint(0, 16, (3,)), randn(2, 3, 8), randint(0, 16, (4,))]] * 6
    predictions, losses = [], []
    for model in (plain, options):
        torch.manual_seed(1)
        predictions.append(model.predict(batch))
        losses.append(model(batch, times = torch.full((6,), .3), noise = [torch.ones(2, 3, 8)] * 6))
    assert (predictions[0].times < 0.5).any()
    torch.testing.assert_close(predictions[1].times, predictions[0].times)
    for a, b in zip(predictions[1].velocities + predictions[1].logits, predictions[0].velocities + predictions[0].logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize('time_sampling, logit_std', [('uniform', 3 ** -0.5 * torch.pi), ('logit_normal', 1.)])
def test_drawn_times_follow_the_configured_sampling(time_sampling, logit_std):
    """logit(t) of uniform t has standard deviation pi / sqrt(3) (a standard logistic); of
    logit-normal t, 1."""
    model = tiny_model(time_sampling = time_sampling)
    packed = model.pack([[(1, randn(1, 4))]] * 500)
    times, _, _ = objective.draw(model, packed, None, None)
    logits = times.logit()
    assert abs(logits.mean()) < 0.2 and abs(logits.std() / logit_std - 1) < 0.1, (logits.mean(), logits.std())


def test_noise_must_hold_exactly_one_tensor_per_instance():
    model = tiny_model()
    batch, times = [[randint(0, 16, (2,)), randn(2, 3, 8)]], torch.tensor([.5])
    for noise in ([], [randn(2, 3, 8), randn(2, 3, 8)]):
        with pytest.raises(ValueError, match = r'noise must hold one tensor per modality instance \(1\), got'):
            model(batch, times = times, noise = noise)


def test_a_double_model_computes_its_loss_in_double():
    """model.double() gives an fp64 reference: rotary, the losses and the consistency endpoints
    no longer round through fp32, so a finite-difference gradient check holds at fp64 tolerances."""
    from torch.func import functional_call
    torch.manual_seed(0)
    model = tiny_model().double()
    batch = [[torch.randint(0, 16, (5,)), torch.randn(2, 3, 8, dtype = torch.float64)], [(1, torch.randn(4, 4, dtype = torch.float64))]]
    draws = dict(times = torch.rand(2), noise = [torch.randn(2, 3, 8, dtype = torch.float64), torch.randn(4, 4, dtype = torch.float64)])
    name = 'transformer.blocks.0.attn_norm.gain'
    loss_of = lambda gain: functional_call(model, {name: gain}, (batch,), draws)
    assert loss_of(model.get_parameter(name)).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_of, (model.get_parameter(name).detach().clone().requires_grad_(),))

"""Sampling under autocast casts the linear weights once per call: the same samples as casting
at every step, the parameters handed back untouched, no stale copies after the weights change;
and the rules around it: no copies with gradients or for float64, kept copies, inference mode."""
import pytest
import torch
from torch import nn, randint, randn

from transfusion_pytorch import autocast_weights

from conftest import mixed_batch, tiny_model
from test_sampling import assert_samples_equal

QUIET = dict(show_progress = False)
BF16 = dict(device_type = 'cpu', dtype = torch.bfloat16)


def randomized(model):
    """Every weight non-zero (zero-initialised output projections would hide wrong velocities)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std = 0.2)
    return model


def without_casting_once(monkeypatch):
    monkeypatch.setattr(autocast_weights, 'autocast_dtype', lambda model: None)


def record_weight_dtypes(layer: nn.Module) -> list:
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append((module.weight.dtype, type(module.weight))))
    return seen


@pytest.mark.parametrize('compile_blocks', [False, True])
def test_samples_equal_casting_at_every_step(monkeypatch, compile_blocks):
    model = randomized(tiny_model(transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, compile_blocks = compile_blocks)))
    prompts = [None, randint(0, 16, (3,)), [randint(0, 16, (2,)), (1, randn(3, 4))]]
    kwargs = dict(max_length = 40, modality_steps = 3, text_temperature = 1., cfg_scale = 2., seed = [1, 2, 3], **QUIET)
    seen = record_weight_dtypes(model.to_logits)   # outside the compiled blocks: hooks run eagerly
    with torch.autocast(**BF16):
        cast_once = model.sample_many(prompts, **kwargs)
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)   # the copies were in place
    with monkeypatch.context() as patch:
        without_casting_once(patch)
        seen.clear()
        with torch.autocast(**BF16):
            every_step = model.sample_many(prompts, **kwargs)
        assert seen and all(dtype == torch.float32 for dtype, _ in seen)
    for a, b in zip(cast_once, every_step):
        assert_samples_equal(a, b, atol = 0)


@pytest.mark.parametrize('cache_kv, compile_step', [(False, False), (True, False), (True, True)])
def test_text_generation_equals_casting_at_every_step(monkeypatch, cache_kv, compile_step):
    model = randomized(tiny_model())
    prompt = randint(0, 16, (2, 3))
    run = lambda: model.generate_text_only(prompt, 20, temperature = 0., cache_kv = cache_kv, compile_step = compile_step)
    with torch.autocast(**BF16):
        cast_once = run()
    without_casting_once(monkeypatch)
    model.__dict__.pop('_text_decoders', None)
    with torch.autocast(**BF16):
        every_step = run()
    assert torch.equal(cast_once, every_step)


def test_parameters_handed_back_also_after_an_error():
    model = randomized(tiny_model())
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    with torch.autocast(**BF16):
        model.sample(randint(0, 16, (3,)), max_length = 12, modality_steps = 2, **QUIET)
        with pytest.raises(ValueError, match = 'sample 1'):   # raised after the swap, checking the prompts
            model.sample_many([randint(0, 16, (3,)), torch.tensor([99])], max_length = 12, **QUIET)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (parameter, value) in before.items():
        assert after[name] is parameter and parameter.dtype == torch.float32 and parameter.requires_grad
        assert torch.equal(parameter, value), name


def test_kept_copies_follow_changed_weights():
    """The text decoder keeps its copies between calls: they must be refreshed, not reused."""
    model = randomized(tiny_model())
    prompt = randint(0, 16, (1, 2))
    with torch.autocast(**BF16):
        first = model.generate_text_only(prompt, 24, temperature = 0.)
        with torch.no_grad():
            for parameter in model.transformer.parameters():
                parameter.normal_(std = 0.2)
        changed = model.generate_text_only(prompt, 24, temperature = 0.)
        model.__dict__.pop('_text_decoders')
        fresh = model.generate_text_only(prompt, 24, temperature = 0.)
    assert torch.equal(changed, fresh) and not torch.equal(changed, first)


def test_user_coders_and_training_keep_fp32_weights():
    decoder = nn.Linear(8, 8)
    model = randomized(tiny_model(dim_latent = 8, modality_default_shape = (2,), modality_decoder = decoder))
    seen_decoder = record_weight_dtypes(decoder)
    seen_logits = record_weight_dtypes(model.to_logits)
    with torch.autocast(**BF16):
        model.generate_modality_only(modality_steps = 2)
        assert [d for d, _ in seen_logits] and all(d == torch.bfloat16 for d, _ in seen_logits)
        assert seen_decoder and all(d == torch.float32 for d, _ in seen_decoder)
        seen_logits.clear()
        model([[randint(0, 16, (3,)), randn(2, 8)]]).backward()   # training: gradients reach the fp32 weights
    assert seen_logits and all(d == torch.float32 and t is nn.Parameter for d, t in seen_logits)
    assert model.to_logits.weight.grad is not None and model.to_logits.weight.grad.abs().sum() > 0


def test_cpu_biases_stay_fp32_parameters():
    """On CPU only the weights are copied: compiled CPU code adds each bias apart from its
    product, in fp32, so the copies and casting at every step see the same bias."""
    model = tiny_model()
    biases = {id(layer): layer.bias for layer in autocast_weights.own_linears(model) if layer.bias is not None}
    assert biases
    with torch.no_grad(), torch.autocast(**BF16), autocast_weights.weights_cast_once(model):
        for layer in autocast_weights.own_linears(model):
            assert layer.weight.dtype == torch.bfloat16
            if layer.bias is not None:
                assert layer.bias is biases[id(layer)] and layer.bias.dtype == torch.float32


def test_time_mlp_and_latent_projections_run_in_fp32_under_autocast_with_their_own_weights():
    """The time MLP and the latent projections in and out run outside autocast, on their fp32
    parameters also while sampling casts the other weights once: under bf16 autocast their
    outputs are exactly the fp32 ones, the velocity included."""
    model = randomized(tiny_model())
    modalities = model.modalities
    parts = modalities.projections[0]
    times, latents, hidden = torch.rand(3), randn(3, 2, 8), randn(3, 2, model.config.transformer.dim)
    run = lambda: (modalities.time_embedding(times), modalities.embed(0, latents, (2,), 0.), modalities.velocity(0, hidden, latents, (2,)))
    expected = run()
    seen = {name: record_weight_dtypes(layer) for name, layer in
            (('time', modalities.time_embedding.mlp[0]), ('in', parts.proj_in), ('out', parts.proj_out))}
    with torch.autocast(**BF16):
        outs = run()
        model.generate_modality_only(modality_steps = 2)
    for out, want in zip(outs, expected):
        assert out.dtype == torch.float32 and torch.equal(out, want)
    for name, dtypes in seen.items():
        assert len(dtypes) > 1 and all(d == torch.float32 and t is nn.Parameter for d, t in dtypes), name
    full_precision = {id(m) for part in (modalities.time_embedding, modalities.projections) for m in part.modules() if isinstance(m, nn.Linear)}
    assert {id(layer) for layer in modalities.full_precision_layers()} == full_precision
    assert not any(id(layer) in full_precision for layer in autocast_weights.own_linears(model))


def test_with_gradients_the_weights_are_not_swapped():
    """A copy would cut the graph: under autocast with gradients the fp32 weights get them."""
    model = tiny_model()
    with torch.autocast(**BF16), autocast_weights.weights_cast_once(model):
        assert model.to_logits.weight.dtype == torch.float32
        loss = model(mixed_batch())
    loss.backward()
    assert model.to_logits.weight.grad is not None and model.to_logits.weight.grad.abs().sum() > 0


def test_a_double_model_is_left_alone(monkeypatch):
    """Autocast does not cast float64: neither may the copies, so fp64 outputs stay fp64's."""
    model = randomized(tiny_model()).double()
    prompt = randint(0, 16, (1, 2))
    run = lambda: model.generate_text_only(prompt, 12, temperature = 0., cache_kv = False)
    with torch.autocast(**BF16):
        cast_once = run()
    without_casting_once(monkeypatch)
    with torch.autocast(**BF16):
        every_step = run()
    assert torch.equal(cast_once, every_step)


def test_kept_copies_are_reused_refreshed_and_skipped_once_no_longer_fp32():
    """`kept` serves the same tensors on every call (compiled code and CUDA graphs read them at
    their addresses), each time with the current weights; a parameter that is no longer plain
    fp32 (the model turned to float64) is used as it is."""
    model = randomized(tiny_model())
    kept: dict = {}
    seen = []
    param = model.to_logits.weight
    with torch.no_grad(), torch.autocast(**BF16):
        for _ in range(2):
            with autocast_weights.weights_cast_once(model, kept):
                seen.append(model.to_logits.weight)
                assert torch.equal(seen[-1], param.to(torch.bfloat16))
            param.add_(1.)
        assert seen[0] is seen[1] and seen[0].dtype == torch.bfloat16
        model.double()
        with autocast_weights.weights_cast_once(model, kept):
            assert model.to_logits.weight is param and param.dtype == torch.float64


def test_copies_kept_in_inference_mode_serve_later_calls():
    model = randomized(tiny_model())
    prompt = randint(0, 16, (1, 2))
    run = lambda: model.generate_text_only(prompt, 12, temperature = 0., cache_kv = True)
    with torch.autocast(**BF16):
        with torch.inference_mode():
            first = run()
        assert torch.equal(run(), first)

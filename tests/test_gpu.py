"""CUDA-only checks (skipped without a GPU): flex attention with its backward, bf16 training,
compiled blocks, cached decoding and CUDA-graph text decoding on the device, frequency tables
rebuilt on the device."""
import pytest
import torch
from torch import randint, randn

from transfusion_pytorch import Transfusion

pytestmark = pytest.mark.gpu


def model_on_cuda(**transformer):
    torch.manual_seed(0)
    return Transfusion(num_text_tokens = 32, dim_latent = (16, 8), modality_default_shape = ((2, 3), (4,)),
                       transformer = dict(dim = 128, depth = 2, heads = 2, dim_head = 64, **transformer)).cuda()


def batch():
    g = torch.Generator().manual_seed(0)
    return [
        [randint(0, 32, (9,), generator = g), randn(3, 5, 16, generator = g), randint(0, 32, (4,), generator = g)],
        [(1, randn(7, 8, generator = g)), randint(0, 32, (3,), generator = g), randn(2, 2, 16, generator = g)],
    ]


def test_flex_and_sdpa_agree_with_gradients_on_cuda():
    dense = model_on_cuda(attention_backend = 'sdpa')
    flex = model_on_cuda(attention_backend = 'flex')
    flex.load_state_dict(dense.state_dict())
    times, noise = torch.rand(3), [randn(3, 5, 16), randn(7, 8), randn(2, 2, 16)]
    losses = []
    for model in (dense, flex):
        loss = model(batch(), times = times, noise = noise)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol = 1e-4, rtol = 1e-4)
    for (name, a), b in zip(dense.named_parameters(), flex.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol = 1e-4, rtol = 1e-3, msg = name)


def test_bf16_autocast_training_is_finite_and_learns():
    model = model_on_cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-3)
    data, times, noise = batch(), torch.rand(3), [randn(3, 5, 16), randn(7, 8), randn(2, 2, 16)]
    first = None
    for _ in range(100):
        with torch.autocast('cuda', dtype = torch.bfloat16):
            loss = model(data, times = times, noise = noise)
        assert torch.isfinite(loss)
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_compiled_blocks_match_eager():
    eager = model_on_cuda()
    compiled = model_on_cuda(compile_blocks = True)
    compiled.load_state_dict(eager.state_dict())
    times, noise = torch.rand(3), [randn(3, 5, 16), randn(7, 8), randn(2, 2, 16)]
    torch.testing.assert_close(compiled(batch(), times = times, noise = noise), eager(batch(), times = times, noise = noise), atol = 1e-4, rtol = 1e-4)
    ids = randint(0, 32, (2, 64)).cuda()
    torch.testing.assert_close(compiled(ids), eager(ids), atol = 1e-4, rtol = 1e-4)


@pytest.mark.parametrize('options', [dict(compile_options = {'triton.cudagraphs': True}),
                                     dict(compile_stack = True, compile_options = {'triton.cudagraphs': True})],
                         ids = ['per_block', 'whole_stack'])
def test_training_with_cuda_graph_blocks_matches_eager(options):
    """Blocks compiled with their kernels in CUDA graphs (what gpu_profile.py times for the
    host-bound training step): three optimizer steps, each with new times and noise, give eager's losses
    and weights, so no replay reads a stale input or an overwritten output. SGD, not Adam: Adam
    scales an element's step by its own gradient's size, so a fusion-rounding difference in a
    near-zero gradient moved one weight of 43,648 by 1.8e-4 on an H200, with compiled blocks
    alone as with CUDA graphs; under SGD the weights agreed to 3e-8."""
    eager = model_on_cuda()
    graphed = model_on_cuda(compile_blocks = True, **options)
    graphed.load_state_dict(eager.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr = 1e-2) for m in (eager, graphed)]
    for step in range(3):
        torch.manual_seed(step)
        times, noise = torch.rand(3), [randn(3, 5, 16), randn(7, 8), randn(2, 2, 16)]
        losses = []
        for model, optimizer in zip((eager, graphed), optimizers):
            loss = model(batch(), times = times, noise = noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol = 1e-4, rtol = 1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol = 1e-4, rtol = 1e-3, msg = name)


def test_cached_equals_uncached_sampling_on_cuda():
    model = model_on_cuda()
    kwargs = dict(max_length = 60, text_temperature = 0., force_modality_at_start = 0, modality_steps = 3, seed = 0, show_progress = False)
    cached, uncached = model.sample(cache_kv = True, **kwargs), model.sample(cache_kv = False, **kwargs)
    assert len(cached) == len(uncached)
    for a, b in zip(cached, uncached):
        if isinstance(a, tuple):
            torch.testing.assert_close(a[1], b[1], atol = 1e-4, rtol = 1e-4)
        else:
            assert torch.equal(a, b)


def test_cuda_graph_text_decoding_equals_eager():
    model = model_on_cuda().eval()
    prompt = randint(0, 32, (2, 3)).cuda()
    eager = model.generate_text_only(prompt, 40, temperature = 0., compile_step = False)
    graphed = model.generate_text_only(prompt, 40, temperature = 0., compile_step = True)
    again = model.generate_text_only(prompt, 40, temperature = 0., compile_step = True)   # reuses the graph
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)


@pytest.mark.parametrize('autocast', [False, True])
def test_cuda_graph_modality_sampling_equals_eager(autocast, recwarn):
    """The ODE evaluation replayed from a CUDA graph gives what eager evaluation gives, with
    guidance (rows duplicated for the unconditional branch), adaptive time conditioning and
    prompts of different lengths (different cache starts per row)."""
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 32, dim_latent = 16, modality_default_shape = (6,), time_conditioning = 'adaptive',
                        transformer = dict(dim = 128, depth = 2, heads = 2, dim_head = 64)).cuda()
    for parameter in model.modalities.adaptive.parameters():   # zero-initialised: make them matter
        torch.nn.init.normal_(parameter, std = 0.02)
    prompts = [randint(0, 32, (5,)).cuda(), randint(0, 32, (2,)).cuda()]
    kwargs = dict(max_length = 40, text_temperature = 0., force_modality_at_start = 0, modality_steps = 4, cfg_scale = 2.,
                  seed = 0, show_progress = False, stop_after_modality = True)
    with torch.autocast('cuda', dtype = torch.bfloat16, enabled = autocast):
        eager = model.sample_many(prompts, cuda_graphs = False, **kwargs)
        graphed = model.sample_many(prompts, cuda_graphs = True, **kwargs)
    for eager_sample, graphed_sample in zip(eager, graphed):
        torch.testing.assert_close(graphed_sample[-1][1], eager_sample[-1][1], atol = 1e-5, rtol = 1e-5)
    assert not [w for w in recwarn if 'CUDA graph capture failed' in str(w.message)]


def test_compiled_blocks_inside_cuda_graphs_sample_like_eager(monkeypatch, recwarn):
    """What gpu_profile.py times as 'graphed, compiled blocks': the ODE evaluation through the
    compiled blocks, captured after a warm-up that compiles them, then replayed. Captured
    without falling back, and the sample matches eager blocks up to fusion rounding."""
    from transfusion_pytorch import decoding
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 32, dim_latent = 16, modality_default_shape = (6,),
                        transformer = dict(dim = 128, depth = 2, heads = 2, dim_head = 64, compile_blocks = True)).cuda()
    kwargs = dict(max_length = 40, text_temperature = 0., force_modality_at_start = 0, modality_steps = 4,
                  seed = 0, show_progress = False, stop_after_modality = True)
    prompts = [randint(0, 32, (5,)).cuda(), randint(0, 32, (2,)).cuda()]
    eager = model.sample_many(prompts, cuda_graphs = False, **kwargs)
    monkeypatch.setattr(decoding, 'COMPILED_STEP_DEVICES', {'cpu', 'cuda'})
    graphed = [model.sample_many(prompts, cuda_graphs = True, **kwargs) for _ in range(2)]   # compile, then reuse
    for run in graphed:
        for eager_sample, graphed_sample in zip(eager, run):
            torch.testing.assert_close(graphed_sample[-1][1], eager_sample[-1][1], atol = 1e-4, rtol = 1e-4)
    assert not [w for w in recwarn if 'CUDA graph capture failed' in str(w.message)]


def test_graphed_function_runs_other_shapes_and_dtypes_eagerly():
    """After capture, inputs of another shape or dtype are not copied (broadcast, cast) into
    the captured buffers: that call runs the function itself."""
    from transfusion_pytorch.graphs import GraphedFunction
    scale = torch.randn(4, device = 'cuda')
    graphed = GraphedFunction(lambda x, t: (x * scale).cumsum(0) * t)
    x, t = torch.randn(3, 4, device = 'cuda'), torch.tensor(0.5, device = 'cuda')
    for _ in range(2):   # capture, then replay
        torch.testing.assert_close(graphed(x, t), (x * scale).cumsum(0) * t)
    assert graphed.graph is not None
    one_row = torch.randn(1, 4, device = 'cuda')           # copied into the (3, 4) buffer it would broadcast
    torch.testing.assert_close(graphed(one_row, t), (one_row * scale).cumsum(0) * t)
    doubles = torch.randn(3, 4, device = 'cuda', dtype = torch.float64)
    result = graphed(doubles, t)                           # copied into the buffer it would be cast to fp32
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, (doubles * scale).cumsum(0) * t)


def test_autocast_weight_copies_keep_their_cuda_graph_and_follow_the_weights(recwarn):
    """Under autocast the CUDA-graph text step reads the decoder's kept weight copies at fixed
    addresses; refreshed each call, a weight change shows in the next call without re-capture
    (the same tokens as a decoder built afresh)."""
    model = model_on_cuda().eval()
    prompt = randint(0, 32, (2, 3)).cuda()
    run = lambda: model.generate_text_only(prompt, 40, temperature = 0., compile_step = True)
    with torch.autocast('cuda', dtype = torch.bfloat16):
        before = run()
        with torch.no_grad():
            for parameter in model.transformer.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        kept = run()
        model.__dict__.pop('_text_decoders')
        fresh = run()
    assert torch.equal(kept, fresh) and not torch.equal(before, kept)
    assert not [w for w in recwarn if 're-record' in str(w.message).lower()]


def test_cuda_graph_text_decoder_follows_weights_whose_storage_was_replaced(recwarn):
    """`param.data = other` (what some EMA swaps do) moves a weight to a new address. A kept
    decoder's CUDA graph read the old addresses when captured; the next call must read the new
    weights: the same tokens as eager decoding and as a decoder built afresh."""
    model = model_on_cuda().eval()
    prompt = randint(0, 32, (2, 3)).cuda()
    run = lambda compile_step = True: model.generate_text_only(prompt, 40, temperature = 0., compile_step = compile_step)
    before = run()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data + torch.randn_like(parameter) * 0.05
    kept = run()
    eager = run(compile_step = False)
    model.__dict__.pop('_text_decoders')
    fresh = run()
    assert not torch.equal(before, eager)
    assert torch.equal(kept, eager) and torch.equal(fresh, eager)


def test_frequency_tables_moved_to_cuda_are_rebuilt_in_fp32():
    """A model cast to bf16 and then moved to the GPU holds the same fp32 rotary and time
    frequencies as an fp32 model moved there, and to rounding the ones built on the CPU."""
    def tables(model):
        return {name: value for name, value in model.named_buffers() if 'freq' in name}
    build = lambda: Transfusion(num_text_tokens = 16, dim_latent = 8, transformer = dict(dim = 32, depth = 1, dim_head = 16))
    on_cpu = tables(build())
    in_fp32, from_bf16 = tables(build().cuda()), tables(build().to(torch.bfloat16).cuda())
    assert sorted(from_bf16) == sorted(on_cpu) == ['modalities.time_embedding.frequencies', 'transformer.rotary.inv_freq']
    for name, value in from_bf16.items():
        assert value.is_cuda and value.dtype == torch.float32, name
        assert torch.equal(value, in_fp32[name]), name
        torch.testing.assert_close(value.cpu(), on_cpu[name], atol = 0, rtol = 1e-6, msg = name)

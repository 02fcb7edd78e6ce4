"""Text decoding (generate_text_only): cached == uncached, compiled steps, kept decoders, special tokens and prompt limits."""
import copy
import io

import pytest
import torch

from transfusion_pytorch import Transfusion


def text_model(**transformer_options) -> Transfusion:
    return Transfusion(num_text_tokens = 32, transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32, **transformer_options))


def test_cached_greedy_equals_uncached():
    model = text_model()
    prompt = torch.randint(0, 32, (3, 4))
    cached = model.generate_text_only(prompt, 30, temperature = 0., cache_kv = True)
    uncached = model.generate_text_only(prompt, 30, temperature = 0., cache_kv = False)
    assert cached.shape == (3, 26)
    assert torch.equal(cached, uncached)


def test_generated_ids_are_text():
    model = text_model()
    out = model.generate_text_only(torch.zeros(2, 1, dtype = torch.long), 50, temperature = 2., min_p = 0.)
    assert out.shape == (2, 49) and int(out.min()) >= 0 and int(out.max()) < 32


@pytest.mark.parametrize('option', [dict(laser = True), dict(value_residual = True), dict(unet_skips = True)])
def test_options_keep_cached_decoding_exact(option):
    model = text_model(**option)
    for merge in model.transformer.skip_merges or []:   # initialised to pass x through: let the skip count
        torch.nn.init.normal_(merge.proj.weight, std = 0.1)
    prompt = torch.randint(0, 32, (2, 3))
    cached = model.generate_text_only(prompt, 20, temperature = 0.)
    assert torch.equal(cached, model.generate_text_only(prompt, 20, temperature = 0., cache_kv = False))


def test_compiled_decode_step_equals_eager_and_is_reused():
    """compile_step compiles the static-shape step once (inductor here, CUDA graphs on a GPU);
    a second call reuses it, and greedy tokens equal the eager ones."""
    model = text_model()
    prompt = torch.randint(0, 32, (2, 3))
    eager = model.generate_text_only(prompt, 24, temperature = 0., compile_step = False)
    compiled = model.generate_text_only(prompt, 24, temperature = 0., compile_step = True)
    decoder = next(iter(model._text_decoders.values()))
    again = model.generate_text_only(prompt, 24, temperature = 0., compile_step = True)
    assert torch.equal(eager, compiled) and torch.equal(compiled, again)
    assert next(iter(model._text_decoders.values())) is decoder


def test_compiled_steps_with_skipped_guards_stay_with_their_model_and_batch():
    """After its first step a decoding loop skips the guards that do not tell compiled versions
    of the step apart. With versions for two models and two batch sizes compiled, calls taken
    in turn must each still run their own: greedy tokens equal eager ones every time."""
    torch.manual_seed(0)
    models = [text_model(), text_model()]
    prompts = [torch.randint(0, 32, (1, 3)), torch.randint(0, 32, (2, 3))]
    expected = {(m, b): models[m].generate_text_only(prompts[b], 20, temperature = 0., compile_step = False)
                for m in range(2) for b in range(2)}
    for m, b in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 1), (1, 0), (0, 1)]:
        tokens = models[m].generate_text_only(prompts[b], 20, temperature = 0., compile_step = True)
        assert torch.equal(tokens, expected[m, b]), (m, b)


def test_decoders_of_new_sizes_do_not_use_up_the_recompile_limit(monkeypatch):
    """Only the latest decoder is kept, and each new one compiles its step again. Those
    versions must not pile up on one shared code object: past the recompile limit every compiled
    step would fail (fullgraph). With the limit lowered to 2, a fourth length still decodes,
    greedy tokens equal to eager."""
    from transfusion_pytorch import compiling
    monkeypatch.setattr(compiling, 'BLOCK_VERSIONS', 2)
    model = text_model()
    prompt = torch.randint(0, 32, (1, 3))
    for length in (8, 9, 10, 8):
        eager = model.generate_text_only(prompt, length, temperature = 0., compile_step = False)
        assert torch.equal(model.generate_text_only(prompt, length, temperature = 0., compile_step = True), eager), length


def test_a_compiled_step_serves_every_temperature_and_min_p(monkeypatch):
    """Temperature and min-p reach the compiled step as buffer values, so a sweep over them
    compiles two versions (greedy and sampled), not one per value: with the recompile limit at 2,
    a fifth setting still decodes, and greedy tokens still equal eager's."""
    from transfusion_pytorch import compiling
    monkeypatch.setattr(compiling, 'BLOCK_VERSIONS', 2)
    model = text_model()
    prompt = torch.randint(0, 32, (1, 3))
    eager = model.generate_text_only(prompt, 12, temperature = 0., compile_step = False)
    for temperature, min_p in [(0., 0.1), (0.5, 0.1), (0.7, 0.3), (1.3, 0.), (0., 0.5), (2., 1.)]:
        tokens = model.generate_text_only(prompt, 12, temperature = temperature, min_p = min_p, compile_step = True)
        assert tokens.shape == (1, 9) and (temperature > 0 or torch.equal(tokens, eager)), (temperature, min_p)


def test_a_dropped_decoder_takes_its_compiled_versions_with_it():
    """Each decoder compiles its own copy of the step; when it is replaced, Dynamo's versions of
    that copy (graphs and their traced tensors) are released, not kept for the process."""
    import gc
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    model = text_model()
    model.generate_text_only(torch.randint(0, 32, (1, 3)), 8, temperature = 0., compile_step = True)
    decoder = next(iter(model._text_decoders.values()))
    code = decoder.region.fn._torchdynamo_orig_callable.__func__.__code__
    assert len(_debug_get_cache_entry_list(code)) == 1
    del decoder
    model.generate_text_only(torch.randint(0, 32, (1, 3)), 9, temperature = 0., compile_step = True)   # another size
    gc.collect()
    assert len(_debug_get_cache_entry_list(code)) == 0


@pytest.mark.parametrize('compile_step', [False, True])
def test_kept_decoders_follow_replaced_weights(compile_step):
    """A model keeps its decoder (cache, compiled step) between calls; it must read the weights
    the model has now, e.g. after load_state_dict(assign = True) replaced them."""
    model, other = text_model(), text_model()
    prompt = torch.randint(0, 32, (2, 3))
    before = model.generate_text_only(prompt, 12, temperature = 0., compile_step = compile_step)
    model.load_state_dict(other.state_dict(), assign = True)
    after = model.generate_text_only(prompt, 12, temperature = 0., compile_step = compile_step)
    expected = other.generate_text_only(prompt, 12, temperature = 0., cache_kv = False)
    assert torch.equal(after, expected) and not torch.equal(before, expected)


def test_compiled_models_pickle_and_deepcopy():
    """Compiled blocks, stack and decode steps are per-process caches: torch.save of the whole
    module and deepcopy (as AveragedModel does) leave them out, and the copies work."""
    model = text_model(compile_blocks = True, compile_stack = True)
    ids, prompt = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (1, 3))
    model(ids).backward()
    expected = model.generate_text_only(prompt, 8, temperature = 0.)        # a compiled step
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copies = [copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only = False)]
    for twin in copies:
        assert '_text_decoders' not in twin.__dict__ and twin.transformer._compiled_stack is None
        assert torch.equal(twin.generate_text_only(prompt, 8, temperature = 0., compile_step = False), expected)
        torch.testing.assert_close(twin(ids), model(ids))


@pytest.mark.parametrize('cache_kv, compile_step', [(False, False), (True, False), (True, True)], ids = ['uncached', 'cached', 'compiled'])
def test_generation_at_a_temperature_past_float32_keeps_to_the_allowed_tokens(cache_kv, compile_step):
    """Every decoding path takes such a temperature (the cached ones hold it in a float32 buffer)
    and still draws only tokens that pass min-p."""
    from transfusion_pytorch.text_generation import min_p_keep
    torch.manual_seed(0)
    model = text_model()
    prompt = torch.randint(0, 32, (1, 3))
    tokens = model.generate_text_only(prompt, 9, temperature = 1e39, min_p = 0.9, cache_kv = cache_kv, compile_step = compile_step)
    sequence = torch.cat((prompt, tokens), dim = 1)
    allowed = min_p_keep(model.text_logits(sequence)[0, 2:-1, :32], 0.9)      # (6 positions, 32)
    assert allowed[torch.arange(6), tokens[0]].all()


def test_generate_text_only_with_min_p_one_is_greedy():
    """min_p = 1 (allowed, documented as the range's end) keeps only the most likely token."""
    model = text_model()
    prompt = torch.randint(0, 32, (2, 3))
    greedy = model.generate_text_only(prompt, 12, temperature = 0.)
    for cache_kv in (True, False):
        assert torch.equal(model.generate_text_only(prompt, 12, temperature = 1.3, min_p = 1., cache_kv = cache_kv), greedy)


def test_kept_text_decoder_follows_the_model_dtype():
    """The decoder (and its cache) is kept per model; after model.to(bf16) the next call must use
    a bf16 cache, giving what a fresh bf16 copy of the model gives."""
    import copy
    model = text_model()
    prompt = torch.randint(0, 32, (2, 3))
    model.generate_text_only(prompt, 10, temperature = 0.)
    fresh = copy.deepcopy(model).to(torch.bfloat16)
    model.to(torch.bfloat16)
    assert torch.equal(model.generate_text_only(prompt, 10, temperature = 0.), fresh.generate_text_only(prompt, 10, temperature = 0.))


@pytest.mark.parametrize('autocast', [False, True])
def test_kept_decoder_serves_calls_in_and_out_of_inference_mode(autocast):
    """A decoder (cache, and under autocast its weight copies) first built under
    torch.inference_mode is written in place by later calls outside it, and the other way round."""
    model = text_model()
    prompt = torch.randint(0, 32, (1, 3))
    run = lambda: model.generate_text_only(prompt, 12, temperature = 0.)
    with torch.autocast('cpu', dtype = torch.bfloat16, enabled = autocast):
        with torch.inference_mode():
            first = run()
        second = run()
        model.__dict__.pop('_text_decoders')
        third = run()
        with torch.inference_mode():
            fourth = run()
    assert torch.equal(first, second) and torch.equal(second, third) and torch.equal(third, fourth)


def test_sampled_cached_equals_uncached_under_one_seed():
    """Both paths draw one uniform per vocabulary entry and row per new token, in the same order,
    from the global generator: under one seed, sampled (not only greedy) tokens agree exactly,
    the first one (chosen at prefill) included, for each temperature and min-p."""
    model = text_model()
    with torch.no_grad():
        model.to_logits.weight *= 4    # peaked logits: min-p then removes most tokens
    prompt = torch.randint(0, 32, (6, 4))
    greedy = model.generate_text_only(prompt, 20, temperature = 0.)
    for temperature, min_p in ((1., 0.), (2., 0.5)):
        torch.manual_seed(7)
        cached = model.generate_text_only(prompt, 20, temperature = temperature, min_p = min_p)
        torch.manual_seed(7)
        uncached = model.generate_text_only(prompt, 20, temperature = temperature, min_p = min_p, cache_kv = False)
        assert torch.equal(cached, uncached), (temperature, min_p)
        assert not torch.equal(cached[:, 0], greedy[:, 0]) and not torch.equal(cached[:, 1:], greedy[:, 1:])


@torch.no_grad()
def test_special_tokens_are_never_chosen_even_when_most_likely():
    """Special-token rows of the head are 10x copies of text rows, so a special id is often the
    full vocabulary's argmax: both paths still choose the argmax over text ids alone."""
    model = text_model()
    text_count, weight = 32, model.to_logits.weight
    weight[text_count:] = 10 * weight[:weight.shape[0] - text_count]
    ids = torch.randint(0, text_count, (2, 3))
    full_argmax_special = False
    for _ in range(12):   # the reference: greedy over text logits, recomputed from scratch
        logits = model.text_logits(ids)[:, -1]
        full_argmax_special |= bool((logits.argmax(-1) >= text_count).any())
        ids = torch.cat((ids, logits[:, :text_count].argmax(-1, keepdim = True)), dim = 1)
    assert full_argmax_special
    for cache_kv in (True, False):
        assert torch.equal(model.generate_text_only(ids[:, :3], 15, temperature = 0., cache_kv = cache_kv), ids[:, 3:])
        sampled = model.generate_text_only(ids[:, :3], 15, temperature = 1., min_p = 0., cache_kv = cache_kv)
        assert int(sampled.max()) < text_count


def test_generate_text_only_prompt_limits():
    """A prompt needs at least one token, and its ids must lie in [0, num_text_tokens): the first
    special id is refused. seq_len at or below the prompt length gives no new tokens."""
    model = text_model()
    with pytest.raises(ValueError, match = r'p >= 1, got \(2, 0\)'):
        model.generate_text_only(torch.zeros((2, 0), dtype = torch.long), 5)
    with pytest.raises(ValueError, match = r'prompt ids must lie in \[0, num_text_tokens=32\)'):
        model.generate_text_only(torch.tensor([[1, 32]]), 5)
    assert model.generate_text_only(torch.tensor([[1, 31]]), 3, temperature = 0.).shape == (1, 1)
    assert model.generate_text_only(torch.tensor([[1, 31]]), 2).shape == (1, 0)


def test_compile_step_is_honoured_after_an_eager_call():
    """Kept decoders are per (batch, length, device, dtype, compile_step): asking for a compiled
    step after an eager decoder of the same sizes was kept gives a compiled one, and back."""
    from transfusion_pytorch.text_generation import text_decoder
    model = text_model()
    for compile_step in (False, True, False):
        assert text_decoder(model, 2, 8, compile_step).compiled == compile_step


def test_float64_model_under_autocast_decodes_with_a_float64_cache():
    """Autocast never casts float64, so a float64 model's attention computes in float64 under
    bf16 autocast and its KV cache must too: cached decoding gives the uncached tokens."""
    model = text_model().double()
    prompt = torch.randint(0, 16, (2, 3))
    with torch.autocast('cpu', dtype = torch.bfloat16):
        cached = model.generate_text_only(prompt, 12, temperature = 0., cache_kv = True)
        uncached = model.generate_text_only(prompt, 12, temperature = 0., cache_kv = False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize('temperature', [0., 1.])
def test_a_cpu_decoding_loop_replays_its_compiled_step_with_the_same_tokens(temperature):
    """On CPU the loop calls the compiled step's graph directly from its third step on: only two
    steps go through torch.compile, and the tokens (sampled ones too, from the same seed) equal
    those of a loop whose every step goes through torch.compile."""
    model = text_model()
    prompt = torch.randint(0, 32, (2, 3))
    model.generate_text_only(prompt, 20, temperature = temperature, compile_step = True)
    decoder = next(iter(model._text_decoders.values()))
    compiled = decoder.step
    through_compile = []
    decoder.step = lambda *arguments: through_compile.append(1) or compiled(*arguments)
    torch.manual_seed(5)
    replayed = model.generate_text_only(prompt, 20, temperature = temperature, compile_step = True)
    assert len(through_compile) == 2
    decoder.region = None   # every step through torch.compile
    torch.manual_seed(5)
    expected = model.generate_text_only(prompt, 20, temperature = temperature, compile_step = True)
    assert len(through_compile) == 2 + 16
    assert torch.equal(replayed, expected)
    if temperature == 0:
        assert torch.equal(replayed, model.generate_text_only(prompt, 20, temperature = 0., compile_step = False))

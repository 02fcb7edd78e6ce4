"""How one sampling step is computed: with a static KV cache, or by re-running the whole sequence.

Both runners answer the same four questions for a set of batch rows (each row one sample), so
the sampler's state machine (sampling.py) is shared and the two are tested equal:

- prefill(row, items): encode a prompt; the logits after it;
- feed(rows, tokens): append one discrete token per row; the logits after it;
- velocity_field(rows, modality, shape, cfg_scale, times): the flow field f(t, x) for the
  current modality instance of each row, whose begin and shape tokens are already in the
  sequence (times: those the solver will evaluate at, where known in advance);
- commit(rows, modality, x1): append the finished instance as clean data (t = 1) and its end
  token; the logits after the end token.

With the cache, the prefix is encoded once, a text step processes one token, and an ODE
evaluation processes only the instance's tokens against the cached prefix.

Glossary: b rows, n instance tokens, c dim_latent, d model dim, v vocabulary, s cache slots.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import pack
from .items import ModalityItem, TextItem
from .experts import Routing
from .graphs import GraphedFunction
from .kv_cache import KVCache
from .masks import AttentionMask, prefix_mask
from .packed_linear import BlockPacks, block_packs
from .replay import RecordedRegion, Replayed, recorded_region
from .token_layout import step_alibi, step_positions, step_routing
from .transfer import host_to_device


# Devices whose cached steps run through the compiled blocks, and whose ODE evaluations are
# compiled as one region (when compile_blocks is on).
# Compiled blocks measured faster on CPU (0.155 -> 0.129 s per 64-token modality, 2 cores) but
# slower on an H200 with eager steps (0.404 -> 0.475 s per 256-token modality,
# benchmarks/results/h200_profile.log), before ODE evaluations were replayed as CUDA graphs.
# Whether fewer, fused kernels pay inside those graphs is what benchmarks/gpu_profile.py
# measures by adding 'cuda' here.
COMPILED_STEP_DEVICES = {'cpu'}


# A cached step attends over the slots its rows have filled, rounded up to a multiple of this,
# not over all max_length slots, where every text token cost time in proportion to max_length.
# With the compaction of finished rows: benchmarks/sample_many.py (8 rows, 2 CPU cores) 2.8 ->
# 1.4 s per call at max_length 384, 23.1 -> 8.5 s at 1536. Rounding keeps the number of
# distinct shapes the compiled blocks see small.
VISIBLE_SLOTS_MULTIPLE = 64


def check_prompt_fits(row: int, length: int, max_length: int, forced: tuple[int, int] | None = None) -> None:
    """forced: (modality, count) when the length ends with the count begin (and shape) tokens
    of a forced modality; the prompt is blamed only if it does not fit on its own."""
    prompt_length = length - (forced[1] if forced else 0)
    if prompt_length >= max_length:
        raise ValueError(f'sample {row}: the prompt takes {prompt_length} tokens, which leaves no room under max_length={max_length}')
    if length >= max_length:
        raise ValueError(f'sample {row}: max_length={max_length} leaves no room for modality {forced[0]} after the prompt')


@dataclass
class StepContext:
    """What a cached step needs besides the new tokens' values, built before the step so that
    repeated steps (the ODE evaluations of one instance) build it once and a CUDA graph of the
    step reads it at fixed addresses."""
    positions: Tensor                    # Int['b q'] (or Int['b q k'] axial) rotary positions
    rotary: tuple[Tensor, Tensor]        # their (cos, sin), Float['b 1 q e/2'] each
    mask: AttentionMask
    routing: Routing | None
    cache: KVCache                       # the runner's cache, or a copy of the rows taking part (their visible slots)
    views: list                          # per layer (keys, values, write slots Int['b q'])
    token_instance: Tensor | None        # Int['b q'] adaptive-conditioning instance per token (-1: none)
    subset: Tensor | None                # Int['b'] rows of the runner's cache when `cache` is a copy
    slots: Tensor                        # Int['b q'] the cache slots the step writes
    packs: list[BlockPacks] | None = None   # per block, its weights packed by MKL (ODE evaluations on CPU)


class CachedRunner:
    def __init__(self, model, batch: int, slots: int, cuda_graphs: bool = True):
        self.model = model
        self.cache = KVCache.for_model(model, batch, slots)
        self.lengths = [0] * batch
        self.cuda_graphs = cuda_graphs
        self.cache_row = list(range(batch))    # row of self.cache holding each sample row (None: released)
        self.released = False                  # rows were released since the cache was last compacted
        self.packs: dict[int, list[BlockPacks] | None] = {}   # per row count, this call's packed weights

    def release(self, row: int) -> None:
        """Sample row `row` takes no more steps. Its cache row is dropped before the next step,
        so the rows still sampling share the whole (smaller) cache: steps over some rows of a
        cache copy those rows and write back what they added, every step until the end."""
        self.cache_row[row] = None
        self.released = True

    def _compact(self) -> None:
        alive = [r for r, c in enumerate(self.cache_row) if c is not None]
        if alive:
            self.cache = self.cache.rows(torch.tensor([self.cache_row[r] for r in alive], device = self.model.device))
        self.cache_row = [None] * len(self.cache_row)
        for position, r in enumerate(alive):
            self.cache_row[r] = position
        self.released = False

    def _context(self, rows: list[int], q: int, span: int, modality: int | None = None,
                 shape: tuple[int, ...] | None = None, isolated: Tensor | None = None) -> StepContext:
        """Context for q new tokens of each of `rows` at their next slots. With `shape`, the first
        prod(shape) tokens are the latents of one instance of `modality`; `span` of the new tokens
        see each other (bidirectional); `isolated` rows see only their new tokens."""
        model, device, b = self.model, self.model.device, len(rows)
        if self.released:
            self._compact()
        latents = math.prod(shape) if shape is not None else 0
        starts = host_to_device(torch.tensor([self.lengths[r] for r in rows], dtype = torch.long), device)
        slots = starts[:, None] + torch.arange(q, device = device)
        visible = self._visible_slots(rows, q)
        alibi = step_alibi(model, shape) if shape is not None else None
        lengths = {self.lengths[r] for r in rows}
        if isolated is None and alibi is None and span == q and lengths == {visible - q}:
            # every new token sees every visible slot (one instance after equally long prefixes):
            # attention without a mask, where SDPA first turned the boolean mask into a float one
            # (64 queries over 70 keys, 4 heads: 95 -> 72 us a call, measured alone)
            mask = AttentionMask()
        else:
            mask = prefix_mask(starts, q, visible, bidirectional_span = span, isolated = isolated, instance_bias = alibi)
        token_instance = None
        if model.modalities.adaptive is not None and latents:
            token_instance = torch.arange(b, device = device)[:, None].expand(-1, q)
            token_instance = torch.where(torch.arange(q, device = device) < latents, token_instance, -1)   # text-like: none
        cache_rows = [self.cache_row[r] for r in rows]
        subset = None if cache_rows == list(range(self.cache.batch)) else host_to_device(torch.tensor(cache_rows), device)
        cache = self.cache if subset is None else self.cache.rows(subset, visible)
        positions = step_positions(model.config, starts, q, shape)
        # computed once here: inside a compiled step Inductor would recompute the angles' cos and
        # sin in every layer's rotation kernel, for every head
        rotary = model.transformer.rotary(positions)
        return StepContext(positions, rotary, mask, step_routing(model.config, modality, b, q, latents, device),
                           cache, cache.layer_views(slots, visible), token_instance, subset, slots)

    def _visible_slots(self, rows: list[int], q: int) -> int:
        """Slots a step over `rows` adding q tokens attends over: up to the longest row's last new
        token, rounded up to a multiple of VISIBLE_SLOTS_MULTIPLE, at most the cache's."""
        needed = max(self.lengths[r] for r in rows) + q
        return min(self.cache.slots, -(-needed // VISIBLE_SLOTS_MULTIPLE) * VISIBLE_SLOTS_MULTIPLE)

    def _run(self, context: StepContext, x: Tensor, time_embedding: Tensor | None = None, compiled: bool | None = None,
             projected: Tensor | None = None) -> Tensor:
        """Float['b q d'] new tokens through the transformer over the cache; returns Float['b q d'].
        compiled: run the compiled blocks (default: on devices in COMPILED_STEP_DEVICES); False
        inside a region that is compiled as a whole. projected: the adaptive conditioning's
        projection of time_embedding, when computed beforehand."""
        model = self.model
        if compiled is None:
            compiled = x.device.type in COMPILED_STEP_DEVICES
        modulations = None
        if context.token_instance is not None and time_embedding is not None:
            modulations = model.modalities.adaptive.per_block(time_embedding, context.token_instance, projected)
        return model.transformer(x, context.positions, context.mask, modulations, cache = context.views,
                                 compiled = compiled, routing = context.routing, rotary = context.rotary, packs = context.packs)

    def _persist(self, context: StepContext) -> None:
        if context.subset is not None:
            self.cache.copy_slots_(context.cache, context.subset, context.slots)

    def prefill(self, row: int, items: list, forced: tuple[int, int] | None = None) -> tuple[Tensor, int]:
        model = self.model
        packed = pack([items], model.config, model.vocab, model.device, close = False)
        check_prompt_fits(row, packed.length, self.cache.slots, forced)
        times = torch.ones(packed.num_instances, device = model.device)
        cache_row = torch.tensor([self.cache_row[row]], device = model.device)
        cache = self.cache.rows(cache_row)
        views = cache.layer_views(packed.positions[None])
        # compiled where steps are (CPU): a new prompt length recompiles once, with the length
        # dynamic (dynamo's automatic dynamic shapes), and not again; the 4-token prompt of
        # generate_modality_only took 4.2 ms eagerly, 2.5 ms compiled (2 CPU cores, bf16)
        hidden = model.packed_hidden(packed, [g.data for g in packed.groups], times, cache = views, kv_length = self.cache.slots,
                                     compiled = model.device.type in COMPILED_STEP_DEVICES)
        self.cache.copy_rows_(cache, cache_row)
        self.lengths[row] = packed.length
        return model.to_logits(hidden[-1]), packed.length

    def feed(self, rows: list[int], tokens: list[int]) -> Tensor:
        model = self.model
        ids = host_to_device(torch.tensor(tokens, dtype = torch.long), model.device)[:, None]
        context = self._context(rows, 1, span = 0)
        hidden = self._run(context, model.token_embedding(ids))
        self._persist(context)
        for r in rows:
            self.lengths[r] += 1
        return model.to_logits(hidden[:, -1])

    def _instance_tokens(self, modality: int, x: Tensor, shape: tuple[int, ...], times: Tensor | None,
                         embedding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens Float['b l d'] of instances x Float['b L c'] of `shape` at times Float['b'], or
        at the one time whose embedding Float['1 d'] was computed beforehand."""
        modalities = self.model.modalities
        if embedding is None:
            time_embedding = modalities.time_embedding(times)                         # (b, d)
        else:
            time_embedding = embedding.expand(x.shape[0], -1)
        tokens = modalities.embed(modality, x.to(time_embedding.dtype), shape, time_embedding[:, None])
        return tokens.to(self.model.token_embedding.weight.dtype), time_embedding

    def velocity_field(self, rows: list[int], modality: int, shape: tuple[int, ...], cfg_scale: float,
                       times: tuple[float, ...] = ()) -> Callable[[Tensor, Tensor], Tensor]:
        """The flow field f(t, x) for instances x Float['b L c'] of `shape` (full resolution) of
        `rows`, at time t Float['']. Everything but x and t is prepared here, once per instance;
        on a GPU each evaluation after the first replays one CUDA graph; with compile_blocks on
        a device in COMPILED_STEP_DEVICES each evaluation is one compiled region, whose graph
        later evaluations call directly (replay.py). times: the times the solver will evaluate
        at (flow.evaluation_times), if known; on CPU their time conditioning is computed here,
        in one batch (_time_table)."""
        model, b = self.model, len(rows)
        token_shape = model.config.modalities[modality].token_shape(shape)
        n = math.prod(token_shape)
        span = 0 if model.config.causal_modality_attention else n
        guided = cfg_scale != 1
        all_rows = rows + rows if guided else rows
        isolated = torch.arange(len(all_rows), device = model.device) >= b if guided else None
        context = self._context(all_rows, n, span, modality, token_shape, isolated)
        compiled = model.config.transformer.compile_blocks and model.device.type in COMPILED_STEP_DEVICES
        if compiled:
            rows_packed = len(all_rows) * n
            if rows_packed not in self.packs:
                self.packs[rows_packed] = block_packs(model, rows_packed)
            context.packs = self.packs[rows_packed]
            region = compiled_evaluation(model)
            at_time = Replayed(lambda x, t: region.fn(self, context, modality, shape, cfg_scale, x, t), region, model.device)
            at_row = Replayed(lambda x, *row: region.fn(self, context, modality, shape, cfg_scale, x, None, row), region, model.device)
            # torchdiffeq passes t as a view of its time grid at the steps and as a new tensor
            # between them: torch.compile compiles a version for each, and a replay takes no views
            run = lambda x, t, row: at_time(x, t.clone()) if row is None else at_row(x, *row)
        else:
            run = lambda x, t, row: evaluate_instance(self, context, modality, shape, cfg_scale, x, t, row)
        # t's value costs nothing to read on CPU; on a GPU it would wait for the device
        table = self._time_table(times) if times and model.device.type == 'cpu' else {}
        lookup = (lambda t: table.get(t.item())) if table else (lambda t: None)
        graphed = GraphedFunction(lambda x, t: run(x, t, lookup(t)), enabled = self.cuda_graphs)
        return lambda t, x: graphed(x, t)

    def _time_table(self, times: tuple[float, ...]) -> dict[float, tuple[Tensor, ...]]:
        """The time conditioning at each of `times`, computed in one batch: {t: (its embedding
        Float['1 d'], and with adaptive conditioning that embedding's projection Float['1 p'])}.
        Computed per evaluation instead, each would read the time MLP's and the adaptive
        projection's weights for a single row (the projection is depth * 6 * d^2 weights).
        Rows are copies, not views: a replay takes no views (replay.py)."""
        modalities = self.model.modalities
        embeddings = modalities.time_embedding(torch.tensor(times, device = self.model.device))
        parts = [embeddings] + ([modalities.adaptive.project(embeddings)] if modalities.adaptive is not None else [])
        return {t: tuple(part[k:k + 1].clone() for part in parts) for k, t in enumerate(times)}

    def commit(self, rows: list[int], modality: int, shape: tuple[int, ...], x1: Tensor) -> Tensor:
        model, b = self.model, x1.shape[0]
        token_shape = model.config.modalities[modality].token_shape(shape)
        n = math.prod(token_shape)
        tokens, time_embedding = self._instance_tokens(modality, x1, shape, torch.ones(b, device = x1.device))
        end = model.token_embedding(torch.full((b, 1), model.vocab.end[modality], device = x1.device))
        span = 0 if model.config.causal_modality_attention else n
        context = self._context(rows, n + 1, span, modality, token_shape)
        hidden = self._run(context, torch.cat((tokens, end), dim = 1), time_embedding)
        self._persist(context)
        for r in rows:
            self.lengths[r] += n + 1
        return model.to_logits(hidden[:, -1])


def evaluate_instance(runner: CachedRunner, context: StepContext, modality: int, shape: tuple[int, ...], cfg_scale: float,
                      x: Tensor, t: Tensor | None, precomputed: tuple[Tensor, ...] | None = None) -> Tensor:
    """One evaluation of the flow field for instances x Float['b L c'] at time t Float[''] over the
    runner's cache, with the step context built beforehand; returns the velocity Float['b L c'].
    precomputed: the time conditioning at t, computed beforehand (CachedRunner._time_table); t
    is then not read. With guidance (cfg_scale != 1) the context holds each row twice, the
    copies isolated. The blocks run uncompiled: either the whole evaluation is compiled
    (compiled_evaluation) or the device's steps do not use the compiled blocks."""
    model = runner.model
    guided = cfg_scale != 1
    x_all = torch.cat((x, x)) if guided else x
    rows = x_all.shape[0]
    embedding, *projected = precomputed or (None,)
    times = t.reshape(1).expand(rows) if precomputed is None else None
    tokens, time_embedding = runner._instance_tokens(modality, x_all, shape, times, embedding)
    projected = projected[0].expand(rows, -1) if projected else None
    hidden = runner._run(context, tokens, time_embedding, compiled = False, projected = projected)
    velocity = model.modalities.velocity(modality, hidden, x_all.to(hidden.dtype), shape).to(x.dtype)   # the ODE state's dtype
    if not guided:
        return velocity
    conditional, unconditional = velocity.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


def compiled_evaluation(model) -> RecordedRegion:
    """evaluate_instance compiled as one region, kept on the model (one per model, so its compiled
    versions are reused across calls; left out of pickles like the text decoders). The time
    embedding, the input and output projections and the modulations then join the blocks in one
    region instead of running eagerly around it: generate_modality_only (64 latent tokens, 30
    evaluations, 2 CPU cores, medians of 9 in 2 alternating rounds) 67.1 / 69.2 -> 62.9 / 62.2
    ms under bf16 autocast, 83.8 / 81.7 -> 77.4 / 78.3 ms in fp32."""
    if getattr(model, '_compiled_evaluation', None) is None:
        model._compiled_evaluation = recorded_region(evaluate_instance, model.config.transformer.compile_options_dict)
    return model._compiled_evaluation


class UncachedRunner:
    """Recomputes every row's whole sequence (all instances clean at t = 1) at every step: the
    slow reference the cached runner is tested against."""

    def __init__(self, model, batch: int, slots: int):
        self.model = model
        self.slots = slots
        self.sequences: list[list] = [[] for _ in range(batch)]

    def _append_tokens(self, row: int, tokens: list[int]) -> None:
        sequence = self.sequences[row]
        ids = torch.tensor(tokens, dtype = torch.long, device = self.model.device)
        if sequence and isinstance(sequence[-1], TextItem):
            sequence[-1] = TextItem(torch.cat((sequence[-1].ids, ids)))
        else:
            sequence.append(TextItem(ids))

    def _run(self, sequences: list[list], current: dict[int, float] | None = None, isolated_docs: set[int] = frozenset()):
        """Packed forward of several sequences; `current` maps a document to the time of its last
        instance (the one being generated), every other instance is clean data at t = 1."""
        model = self.model
        packed = pack(sequences, model.config, model.vocab, model.device, close = False)
        times = torch.ones(packed.num_instances, device = model.device)
        last_instance = {}
        for i, doc in enumerate(packed.instance_sample):
            last_instance[doc] = i
        for doc, t in (current or {}).items():
            times[last_instance[doc]] = t
        isolated = None
        if isolated_docs:
            flags = torch.zeros(packed.num_instances + 1, dtype = torch.bool, device = model.device)
            flags[[last_instance[d] for d in isolated_docs]] = True
            isolated = flags[packed.instance]
        hidden = model.packed_hidden(packed, [g.data for g in packed.groups], times, isolated, compiled = False)
        return packed, hidden, last_instance

    def release(self, row: int) -> None:
        self.sequences[row] = []

    def _last_logits(self, rows: list[int]) -> Tensor:
        packed, hidden, _ = self._run([self.sequences[r] for r in rows])
        return self.model.to_logits(hidden[[b - 1 for _, b in packed.sample_slices]])

    def prefill(self, row: int, items: list, forced: tuple[int, int] | None = None) -> tuple[Tensor, int]:
        self.sequences[row] = list(items)
        packed, hidden, _ = self._run([self.sequences[row]])
        check_prompt_fits(row, packed.length, self.slots, forced)
        return self.model.to_logits(hidden[-1]), packed.length

    def feed(self, rows: list[int], tokens: list[int]) -> Tensor:
        for r, token in zip(rows, tokens):
            self._append_tokens(r, [token])
        return self._last_logits(rows)

    def velocity_field(self, rows: list[int], modality: int, shape: tuple[int, ...], cfg_scale: float,
                       times: tuple[float, ...] = ()) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda t, x: self._velocity(rows, modality, shape, x, t, cfg_scale)

    def _velocity(self, rows: list[int], modality: int, shape: tuple[int, ...], x: Tensor, t: Tensor, cfg_scale: float) -> Tensor:
        model = self.model
        guided = cfg_scale != 1
        sequences = [self.sequences[r] + [ModalityItem(modality, x_row.reshape(*shape, -1), wrapped = False)] for r, x_row in zip(rows, x)]
        if guided:
            sequences = sequences + sequences
        docs = range(len(sequences))
        packed, hidden, last_instance = self._run(sequences, {d: t for d in docs}, set(docs[len(rows):]) if guided else set())
        inputs = torch.cat((x, x)) if guided else x
        velocity = torch.cat([
            model.modalities.velocity(modality, hidden[packed.instance == last_instance[d]][None], inputs[d:d + 1].to(hidden.dtype), shape)
            for d in docs
        ]).to(x.dtype)
        if not guided:
            return velocity
        conditional, unconditional = velocity.chunk(2)
        return unconditional + cfg_scale * (conditional - unconditional)

    def commit(self, rows: list[int], modality: int, shape: tuple[int, ...], x1: Tensor) -> Tensor:
        for r, x_row in zip(rows, x1):
            self.sequences[r].append(ModalityItem(modality, x_row.reshape(*shape, -1), wrapped = False))
            self._append_tokens(r, [self.model.vocab.end[modality]])
        return self._last_logits(rows)

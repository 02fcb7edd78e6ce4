"""The sampling state machine: text until a begin token, a constrained shape, the flow ODE, the
end token, and on until EOS or max_length.

Each row (one sample) moves through phases:

    text --begin--> shape --shape end--> modality --ODE, end token--> text ... --EOS--> done

Rows in the same phase share forwards: all rows that need a discrete token are fed together,
and all rows generating an instance of the same modality and shape integrate one batched ODE.
How a step is computed (KV cache or full recomputation) is the runner's business
(decoding.py). Every random draw of a row comes from that row's own generator when seeds are
given, so batched sampling equals sampling the rows one by one.

max_length counts every token of a sample's sequence: BOS, prompt, text, begin/shape/end tokens
and latent tokens. No modality is started that cannot finish within it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import flow
from .autocast_weights import weights_cast_once
from .items import TextItem, to_items
from .decoding import CachedRunner, UncachedRunner
from .modes import eval_mode
from .sampling_options import SamplingOptions, check_flag, check_options, fixed_shapes, forced_start, row_generators
from .text_generation import choose_tokens
from .tokens import ShapeDecoder, min_instance_length


@dataclass
class Row:
    index: int
    output: list                              # items returned to the user, prompt items first
    generator: torch.Generator | None
    length: int = 0                           # tokens already in the sequence
    phase: str = 'text'                       # 'text' | 'shape' | 'modality' | 'done'
    logits: Tensor | None = None              # next-token logits once the queue is fed
    queue: list[int] = field(default_factory = list)
    text: list[int] = field(default_factory = list)
    modality: int | None = None
    shape: tuple[int, ...] | None = None
    shape_decoder: ShapeDecoder | None = None
    stop_after_modality: bool = False


class Sampler:
    def __init__(self, model, options: SamplingOptions, batch: int):
        self.model = model
        self.vocab = model.vocab
        self.options = options
        if options.cache_kv:
            self.runner = CachedRunner(model, batch, options.max_length, cuda_graphs = options.cuda_graphs)
        else:
            self.runner = UncachedRunner(model, batch, options.max_length)

    # what a modality needs

    def fixed_shape(self, modality: int) -> tuple[int, ...] | None:
        spec = self.model.config.modalities[modality]
        if modality in self.options.fixed_modality_shape:
            return self.options.fixed_modality_shape[modality]
        return None if spec.shape_tokens else spec.default_shape

    def token_shape(self, modality: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.model.config.modalities[modality].token_shape(shape)

    def min_length(self, modality: int) -> int:
        spec, fixed = self.model.config.modalities[modality], self.fixed_shape(modality)
        return min_instance_length(spec.num_axes, spec.shape_tokens, None if fixed is None else spec.token_shape(fixed))

    def remaining_need(self, row: Row) -> int:
        """Fewest tokens the row's started instance still needs (latents and end token, plus the
        rest of its shape when that is still to be decoded)."""
        if row.phase == 'modality':
            return math.prod(self.token_shape(row.modality, row.shape)) + 1
        spec = self.model.config.modalities[row.modality]
        return min_instance_length(spec.num_axes, spec.shape_tokens, None) - 1

    # decisions

    def allowed_mask(self, row: Row) -> Tensor:
        """Bool['v'] tokens the row may emit next."""
        vocab, budget = self.vocab, self.options.max_length - row.length
        if row.phase == 'shape':
            ids = row.shape_decoder.allowed(budget)
        else:
            ids = list(range(vocab.num_text_tokens))
            ids += [vocab.begin[m] for m in range(vocab.num_modalities) if self.min_length(m) <= budget]
            if row.text or any(isinstance(item, tuple) or item.numel() for item in row.output):
                ids.append(vocab.eos)  # a sample never ends empty (empty prompt text holds nothing): it must stay valid input
        mask = torch.zeros(vocab.size, dtype = torch.bool, device = self.model.device)
        mask[ids] = True
        return mask

    def decide(self, rows: list[Row]) -> None:
        """Choose the next token of every row whose logits are ready."""
        for row in rows:
            if row.phase == 'text' and row.length >= self.options.max_length:
                self.finish(row)
        rows = [r for r in rows if r.phase != 'done']
        if not rows:
            return
        masks = torch.stack([self.allowed_mask(r) for r in rows])
        empty = (~masks.any(dim = -1)).tolist()
        logits = torch.stack([r.logits for r in rows])
        masks[torch.tensor(empty, device = masks.device)] = True        # placeholder, handled below
        generators = [r.generator for r in rows] if any(r.generator is not None for r in rows) else None
        tokens = choose_tokens(logits, self.options.text_temperature, self.options.text_min_p, masks, generators).tolist()
        for row, token, is_empty in zip(rows, tokens, empty):
            row.logits = None
            if is_empty:
                self.shape_fallback(row)
            elif row.phase == 'shape':
                self.push_shape_token(row, token)
            else:
                self.push_text_token(row, token)

    def push_text_token(self, row: Row, token: int) -> None:
        vocab = self.vocab
        modality = vocab.modality_of_begin(token)
        if token == vocab.eos:
            self.finish(row)
        elif modality is not None:
            self.start_modality(row, modality)
        else:
            row.text.append(token)
            row.queue.append(token)

    def start_modality(self, row: Row, modality: int, shape: tuple[int, ...] | None = None) -> None:
        self.flush_text(row)
        row.modality = modality
        row.queue.append(self.vocab.begin[modality])
        spec = self.model.config.modalities[modality]
        shape = shape if shape is not None else self.fixed_shape(modality)
        if shape is not None:
            if spec.shape_tokens:
                row.queue.extend(self.vocab.shape_ids(spec.token_shape(shape)))
            row.shape, row.phase = tuple(shape), 'modality'
        else:
            # the decoded grid is transformer-side: its data shape (grid x downsample) must fit too
            row.shape_decoder = ShapeDecoder(self.vocab, spec.num_axes, self.model.config.max_shape_value // spec.downsample)
            row.phase = 'shape'

    def push_shape_token(self, row: Row, token: int) -> None:
        row.queue.append(token)
        row.shape_decoder.push(token)
        if row.shape_decoder.done:  # the decoded shape is the transformer-side grid
            shape = self.model.config.modalities[row.modality].data_shape(row.shape_decoder.shape)
            row.shape, row.phase, row.shape_decoder = shape, 'modality', None

    def shape_fallback(self, row: Row) -> None:
        """No shape token fits (max_length reached mid-shape): use the default shape if it fits."""
        default = self.model.config.modalities[row.modality].default_shape
        if default is not None and math.prod(self.token_shape(row.modality, default)) + 1 <= self.options.max_length - row.length:
            warnings.warn(f'sampling: could not decode a shape for modality {row.modality}; using the default shape {default}')
            row.shape, row.phase, row.shape_decoder = default, 'modality', None
        else:
            warnings.warn(f'sampling: no room left for modality {row.modality}; ending the sample')
            self.finish(row)

    def flush_text(self, row: Row) -> None:
        if row.text:
            row.output.append(torch.tensor(row.text, dtype = torch.long, device = self.model.device))
            row.text = []

    def finish(self, row: Row) -> None:
        self.flush_text(row)
        row.phase, row.queue = 'done', []
        self.runner.release(row.index)

    # forwards

    def feed(self, rows: list[Row]) -> None:
        tokens = [r.queue.pop(0) for r in rows]
        logits = self.runner.feed([r.index for r in rows], tokens)
        for row, row_logits in zip(rows, logits):
            row.length += 1
            row.logits = row_logits if not row.queue else None

    def generate_instances(self, rows: list[Row]) -> None:
        """One batched ODE for rows generating the same modality and shape (one row with an
        adaptive solver)."""
        model, options = self.model, self.options
        modality, shape = rows[0].modality, rows[0].shape
        spec = model.config.modalities[modality]
        count = math.prod(shape)
        weights = model.token_embedding.weight.dtype           # the ODE runs in at least fp32; results come in the model's dtype
        noise = torch.stack([
            torch.randn((count, spec.dim_latent), generator = r.generator, device = model.device) for r in rows
        ]).to(torch.promote_types(weights, torch.float32))
        indices = [r.index for r in rows]
        times = flow.evaluation_times(options.modality_steps, options.ode_method, noise.dtype)
        field = self.runner.velocity_field(indices, modality, shape, options.cfg_scale, times)
        x1 = flow.integrate(field, noise, options.modality_steps, options.ode_method)
        latents = torch.stack([model.to_user_layout(modality, x.reshape(*shape, -1)) for x in x1]).to(weights)
        decoded = model.modalities.decode(modality, latents)
        continuing = [r for r in rows if not r.stop_after_modality]
        if continuing:
            logits = self.runner.commit([r.index for r in continuing], modality, shape, x1[[rows.index(r) for r in continuing]])
        for row, data in zip(rows, decoded):
            row.output.append((modality, data))
            row.length += math.prod(spec.token_shape(shape)) + 1
            row.modality, row.shape = None, None
            row.phase = 'done' if row.stop_after_modality else 'text'
            if row.phase == 'done':
                self.runner.release(row.index)
        for row, row_logits in zip(continuing, logits if continuing else []):
            row.logits = row_logits

    def loop(self, rows: list[Row]) -> list[list]:
        """Step every row until all are done; returns each row's items."""
        total = sum(self.options.max_length - r.length for r in rows)
        with tqdm(total = total, disable = not self.options.show_progress, desc = 'sampling', leave = False) as progress:
            while any(r.phase != 'done' for r in rows):
                before = sum(r.length for r in rows)
                self.step(rows)
                progress.update(sum(r.length for r in rows) - before)
        return [r.output for r in rows]

    def step(self, rows: list[Row]) -> None:
        ready = [r for r in rows if r.phase in ('text', 'shape') and not r.queue and r.logits is not None]
        self.decide(ready)
        waiting = [r for r in rows if r.phase == 'modality' and not r.queue]
        # an adaptive solver picks its steps from one error norm over the whole state, so rows
        # solved together would change each other's steps: each row then solves alone
        batched = self.options.ode_method in flow.FIXED_GRID_METHODS
        groups: dict[tuple, list[Row]] = {}
        for row in waiting:
            groups.setdefault((row.modality, row.shape) if batched else (row.index,), []).append(row)
        for group in groups.values():
            self.generate_instances(group)
        feeding = [r for r in rows if r.queue and r.phase != 'done']
        if feeding:
            self.feed(feeding)


# public entry points

def _normalize_prompt(prompt) -> list:
    """A prompt as a list of user items: None, text, a modality, (index, tensor), or a sample."""
    if prompt is None:
        return []
    if torch.is_tensor(prompt) or isinstance(prompt, tuple):
        return [prompt]
    if isinstance(prompt, list):
        return list(prompt)
    raise TypeError(f'a prompt must be a tensor, a (modality_index, tensor) pair or a list of items, got {type(prompt).__name__}')


def _echo(item, device) -> object:
    """A prompt item as it appears in the output: text as a 1-D long tensor, modalities as pairs."""
    if isinstance(item, tuple):
        return (int(item[0]), item[1])
    if item.is_floating_point():
        return (0, item)
    return item.reshape(-1).long().to(device)


@torch.no_grad()
def sample_many(model, prompts: list, *, force_modality_at_start = None, seed = None, stop_after_modality: bool = False, **options) -> list[list]:
    """See Transfusion.sample_many."""
    if not isinstance(prompts, (list, tuple)):   # a tensor would read as one prompt per token
        raise TypeError(f'prompts must be a list of prompts (each None, a tensor, a pair or a list of items), got {type(prompts).__name__}')
    stop_after_modality = check_flag(stop_after_modality, 'stop_after_modality')
    options = SamplingOptions(**options)
    check_options(options)
    options.fixed_modality_shape = fixed_shapes(model, options.fixed_modality_shape)
    forced = forced_start(model, force_modality_at_start)
    user_prompts = [_normalize_prompt(p) for p in prompts]
    generators = row_generators(seed, len(user_prompts), model.device)
    # from encoding the prompts on: a trainable encoder must not run in train mode
    with eval_mode(model), weights_cast_once(model):
        items = model_items(model, user_prompts)
        rows = [Row(index = i, output = [_echo(x, model.device) for x in p], generator = g, stop_after_modality = stop_after_modality)
                for i, (p, g) in enumerate(zip(user_prompts, generators))]
        sampler = Sampler(model, options, len(rows))
        for row, row_items in zip(rows, items):
            prefill_row(sampler, row, row_items, forced)
        return sampler.loop(rows)


def prefill_row(sampler: Sampler, row: Row, items: list, forced: tuple[int, tuple[int, ...] | None] | None) -> None:
    """Encode a row's prompt, with the begin (and shape) tokens of a forced first modality."""
    if forced is not None:
        sampler.start_modality(row, *forced)
    # forced begin/shape tokens are known: encode them with the prompt in one forward
    opening, row.queue = row.queue, []
    forced_tokens = None if forced is None else (forced[0], len(opening))
    opening = [TextItem(torch.tensor(opening, dtype = torch.long, device = sampler.model.device))] if opening else []
    row.logits, row.length = sampler.runner.prefill(row.index, items + opening, forced_tokens)
    max_length = sampler.options.max_length
    if forced is not None and sampler.remaining_need(row) > max_length - row.length:
        raise ValueError(f'sample {row.index}: max_length={max_length} leaves no room for modality {forced[0]} after the prompt')


def model_items(model, prompts: list[list]) -> list[list]:
    """Validate prompts like training samples (encoders applied); empty prompts stay empty, and
    errors name a prompt by its index among all prompts."""
    if not prompts:
        return []
    samples, check = to_items(prompts, model.config, model.modalities.encode, allow_empty = True)
    check.raise_if_invalid()
    return samples

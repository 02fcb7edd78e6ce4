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
from .batch import TextItem, to_items
from .config import is_integer, is_real_number
from .decoding import CachedRunner, UncachedRunner
from .modes import eval_mode
from .text_generation import check_text_sampling, choose_tokens
from .tokens import ShapeDecoder, min_instance_length


@dataclass
class SamplingOptions:
    max_length: int = 2048
    text_temperature: float = 1.
    text_min_p: float = 0.1
    modality_steps: int = 16
    ode_method: str = 'midpoint'
    cfg_scale: float = 1.
    cache_kv: bool = True
    fixed_modality_shape: dict[int, tuple[int, ...]] = field(default_factory = dict)
    show_progress: bool = True
    cuda_graphs: bool = True


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


def _as_shape(value, argument: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in value):
        raise ValueError(f'{argument}: a shape must be a tuple of positive ints, got {value!r}')
    return tuple(value)


def _shape_problem(model, modality: int, shape: tuple[int, ...]) -> str | None:
    """Why `shape` cannot be sampled for `modality` (None if it can): the data-side checks of
    training (batch.canonical_latent), so a sample is valid input as it is."""
    spec = model.config.modalities[modality]
    if spec.num_axes is not None and len(shape) != spec.num_axes:
        return f'modality {modality} has {spec.num_axes} axes, got shape {shape}'
    if not spec.shape_tokens and shape != spec.default_shape:
        return f'modality {modality} has shape tokens off; its shape is fixed at {spec.default_shape}'
    if any(a % spec.downsample for a in shape):
        return f'shape {shape} for modality {modality} must be divisible by its downsample factor {spec.downsample}'
    if any(a > model.config.max_shape_value for a in shape):
        return f'shape {shape} for modality {modality} exceeds max_shape_value={model.config.max_shape_value}'
    return None


def _fixed_shapes(model, fixed_modality_shape) -> dict[int, tuple[int, ...]]:
    """{modality: shape}: from a dict (each must fit its modality), or one shape for every
    modality it fits (at least one)."""
    count = model.config.num_modalities
    if fixed_modality_shape is None:
        return {}
    if not isinstance(fixed_modality_shape, dict):
        shape = _as_shape(fixed_modality_shape, 'fixed_modality_shape')
        problems = [_shape_problem(model, m, shape) for m in range(count)]
        if all(problems):
            raise ValueError(f'fixed_modality_shape {shape} fits no modality: ' + '; '.join(problems or ['the model has no modalities']))
        return {m: shape for m, problem in enumerate(problems) if problem is None}
    shapes = {}
    for m, value in fixed_modality_shape.items():
        if not isinstance(m, int) or isinstance(m, bool):
            raise TypeError(f'fixed_modality_shape keys must be modality indices, got {m!r}')
        if not 0 <= m < count:
            raise ValueError(f'fixed_modality_shape names modality {m!r}, but the model has {count}')
        shapes[m] = _as_shape(value, f'fixed_modality_shape[{m}]')
        if problem := _shape_problem(model, m, shapes[m]):
            raise ValueError(f'fixed_modality_shape: {problem}')
    return shapes


def forced_start(model, value, argument: str = 'force_modality_at_start') -> tuple[int, tuple[int, ...] | None] | None:
    """force_modality_at_start as (modality, shape or None), checked; errors name `argument`."""
    if value is None:
        return None
    modality, shape = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
    if not isinstance(modality, int) or isinstance(modality, bool):
        raise TypeError(f'force_modality_at_start must be a modality index or (index, shape), got {value!r}')
    if not 0 <= modality < model.config.num_modalities:
        raise ValueError(f'force_modality_at_start names modality {modality}, but the model has {model.config.num_modalities}')
    if shape is not None:
        shape = _as_shape(shape, argument)
        if problem := _shape_problem(model, modality, shape):
            raise ValueError(f'{argument}: {problem}')
    return modality, shape


def _check_options(options: SamplingOptions) -> None:
    for name, least in (('max_length', 2), ('modality_steps', 1)):
        value = getattr(options, name)
        if not is_integer(value):
            raise TypeError(f'{name} must be an int, got {type(value).__name__}')
        if value < least:
            raise ValueError(f'{name} must be at least {least}, got {value}')
    check_text_sampling(options.text_temperature, options.text_min_p, 'text_temperature', 'text_min_p')
    if not is_real_number(options.cfg_scale):
        raise TypeError(f'cfg_scale must be a number (1: no guidance), got {type(options.cfg_scale).__name__}')
    if not math.isfinite(options.cfg_scale):
        raise ValueError(f'cfg_scale must be finite (1: no guidance), got {options.cfg_scale}')
    flow.check_method(options.ode_method)
    # NumPy numbers pass the checks above; from here on they are plain Python numbers
    options.max_length, options.modality_steps = int(options.max_length), int(options.modality_steps)
    options.text_temperature, options.text_min_p = float(options.text_temperature), float(options.text_min_p)
    options.cfg_scale = float(options.cfg_scale)


def _generators(seed, count: int, device) -> list:
    """One generator per row: seed (an int) seeds row r with seed + r; a list or tuple gives
    each row's seed."""
    if seed is None:
        return [None] * count
    if not isinstance(seed, (list, tuple)) and not is_integer(seed):
        raise TypeError(f'seed must be an int, or a list of ints (one per prompt), got {type(seed).__name__}')
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + r for r in range(count)]
    if len(seeds) != count:
        raise ValueError(f'got {len(seeds)} seeds for {count} prompts')
    for r, value in enumerate(seeds):
        if not is_integer(value) or not -2 ** 63 <= value < 2 ** 64:
            raise ValueError(f'the seed of prompt {r} must be an int in [-2**63, 2**64), got {value!r}')
    return [torch.Generator(device = device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_many(model, prompts: list, *, force_modality_at_start = None, seed = None, stop_after_modality: bool = False, **options) -> list[list]:
    """See Transfusion.sample_many."""
    options = SamplingOptions(**options)
    _check_options(options)
    options.fixed_modality_shape = _fixed_shapes(model, options.fixed_modality_shape)
    forced = forced_start(model, force_modality_at_start)
    user_prompts = [_normalize_prompt(p) for p in prompts]
    generators = _generators(seed, len(user_prompts), model.device)
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
    opening = [TextItem(torch.tensor(opening, dtype = torch.long, device = sampler.model.device))] if opening else []
    row.logits, row.length = sampler.runner.prefill(row.index, items + opening)
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

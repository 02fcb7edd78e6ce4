"""Per-modality parts: latent projection in, velocity head out, time conditioning, and the
optional encoder/decoder between raw data and latents.

Time conditioning is computed once per modality instance (Float['i d']), never per token
through a wide projection; text tokens are never touched by it.

Glossary: i instances, l latent tokens, c dim_latent, d model dim, n packed tokens.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import ModalityConfig, TransfusionConfig
from .constants import ConstantTables
from .experts import run_linear
from .modes import eval_mode
from .rng import rng_state, set_rng_state
from .transformer import Modulation
from .unet import LatentUNet


class TimeEmbedding(ConstantTables):
    """Float['i'] times in [0, 1] -> Float['i d'] through sinusoidal features and an MLP.

    Under autocast the MLP runs in full precision (full_precision_linear), so the embedding
    comes out in fp32."""

    def __init__(self, dim: int, num_frequencies: int = 128):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.register_tables()
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def tables(self, device) -> dict[str, Tensor]:
        steps = torch.arange(self.num_frequencies, dtype = torch.float32, device = device)
        return dict(frequencies = torch.exp(-math.log(10_000.) * steps / self.num_frequencies))

    def forward(self, times: Tensor) -> Tensor:
        angles = 1000. * times.float()[:, None] * self.frequencies                # (i, f)
        features = torch.cat((angles.sin(), angles.cos()), dim = -1)
        first, activation, second = self.mlp
        return full_precision_linear(second, activation(full_precision_linear(first, features)))


def full_precision_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) outside autocast, in the layer's dtype (fp32 unless the model itself was cast).

    For the time MLP and the latent projections in and out. Their products are narrow (one row
    per instance, or dim_latent wide), so fp32 costs nothing on a GPU, while on CPU a bf16
    product of that size costs several times an fp32 one (oneDNN's fixed cost, on 2 cores:
    1x256 @ 256x256 35 against 7 us, 64x64 @ 64x256 33 against 14 us), four per ODE evaluation
    of a 64-token modality: ~4 ms of a 30-evaluation call under bf16 autocast. The velocity, which
    the ODE integrates in fp32, is then not rounded to bf16. The cast-once weight copies leave
    these layers alone (autocast_weights.own_linears)."""
    with torch.autocast(x.device.type, enabled = False):
        return run_linear(layer, x.to(layer.weight.dtype))


class AdaptiveConditioning(nn.Module):
    """Per-instance adaLN parameters for every block, zero-initialised (identity at start).

    Projects the instance's time embedding Float['i d'] once per block and scatters it to that
    instance's latent tokens; text-like tokens get zeros, which leaves them exactly unchanged."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.depth = depth
        self.proj = nn.Linear(dim, depth * 6 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def project(self, time_embedding: Tensor) -> Tensor:
        """Float['i d'] -> every block's parameters for those instances, Float['i (l six d)']."""
        return run_linear(self.proj, F.silu(time_embedding))

    def per_block(self, time_embedding: Tensor, token_instance: Tensor, projected: Tensor | None = None) -> list[Modulation]:
        """time_embedding Float['i d']; token_instance Int['b n'] (-1: not modulated); projected:
        project(time_embedding) when computed beforehand."""
        projected = self.project(time_embedding) if projected is None else projected
        params = rearrange(projected, 'i (l six d) -> l i six d', l = self.depth, six = 6)
        params = F.pad(params, (0, 0, 0, 0, 0, 1))                                   # row i = zeros
        index = torch.where(token_instance >= 0, token_instance, params.shape[1] - 1)
        return [Modulation(*layer[index].unbind(dim = -2)) for layer in params]     # each (b, n, d)


def refuse_batch_statistics(encoders: nn.ModuleList) -> None:
    """Trainable encoders run in train mode over all same-shape instances of a batch at once,
    so batch statistics would mix samples (and later instances into earlier tokens), breaking
    the attention rule."""
    for m, encoder in enumerate(encoders):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f'modality {m} encoder: {name or "the module"} ({type(module).__name__}) normalises with batch '
                                 'statistics, which would mix the samples of a batch when trained (train_modality_encoders=True); '
                                 'use GroupNorm or LayerNorm, or keep the encoder frozen (it then runs in eval mode)')


class ModalityProjections(nn.Module):
    """Latent tokens in (Float['l c'] -> Float['l d']) and predicted velocity out; with a
    downsampling factor, a one-level U-Net (unet.py) in place of the two projections."""

    def __init__(self, spec: ModalityConfig, dim: int):
        super().__init__()
        self.unet = None
        if spec.downsample > 1:
            self.unet = LatentUNet(spec.dim_latent, dim, spec.downsample, spec.num_axes, spec.unet_dim)
        else:
            self.proj_in = nn.Linear(spec.dim_latent, dim)
            self.proj_out = nn.Linear(dim, spec.dim_latent)


def refuse_decoders_sharing_encoder_weights(encoders: nn.ModuleList, decoders: nn.ModuleList) -> None:
    """Decoders are frozen; a weight a decoder shares with a trainable encoder (a tied
    autoencoder, or one module given as both) would be frozen with it, silently."""
    encoder_weights = {id(p): (m, name) for m, encoder in enumerate(encoders) for name, p in encoder.named_parameters()}
    for m, decoder in enumerate(decoders):
        for name, p in decoder.named_parameters():
            if id(p) in encoder_weights:
                e, encoder_name = encoder_weights[id(p)]
                raise ValueError(f'modality {m} decoder: {name} is also modality {e} encoder\'s {encoder_name}; decoders are frozen, '
                                 'so with train_modality_encoders=True it would freeze that encoder weight too: give the decoder '
                                 'weights of its own, or keep the encoders frozen')


class Modalities(nn.Module):
    """All modality-specific modules of a Transfusion model."""

    def __init__(self, config: TransfusionConfig, encoders: tuple, decoders: tuple, train_encoders: bool = False):
        super().__init__()
        dim = config.transformer.dim
        self.config = config
        self.projections = nn.ModuleList([ModalityProjections(m, dim) for m in config.modalities])
        self.time_embedding = TimeEmbedding(dim) if config.modalities else None
        self.adaptive = AdaptiveConditioning(dim, config.transformer.depth) if config.time_conditioning == 'adaptive' and config.modalities else None
        self.encoders = nn.ModuleList([e if e is not None else nn.Identity() for e in encoders])
        self.decoders = nn.ModuleList([d if d is not None else nn.Identity() for d in decoders])
        self.has_encoder = tuple(e is not None for e in encoders)
        self.has_decoder = tuple(d is not None for d in decoders)
        self.train_encoders = train_encoders
        if train_encoders:
            refuse_batch_statistics(self.encoders)
            refuse_decoders_sharing_encoder_weights(self.encoders, self.decoders)
        # decoders only run in sampling, under no_grad: no loss here reaches them, so they are
        # frozen even when the encoders train (an optimizer's weight decay would shrink them)
        for module in (*(() if train_encoders else self.encoders), *self.decoders):
            module.requires_grad_(False)

    @contextmanager
    def encoder_state_kept_on_error(self):
        """A trainable encoder may update buffers as it runs (BatchNorm-like statistics, power
        iterations) and draw random numbers (dropout); a batch rejected after encoding must leave
        both the buffers and the random number generators as they were."""
        saved = [(b, b.clone()) for b in self.encoders.buffers()] if self.train_encoders else []
        generators = rng_state() if self.train_encoders else None
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            if generators is not None:
                set_rng_state(generators)
            raise

    def encode(self, modality: int, entries: list[tuple[int, int, Tensor]]) -> list[Tensor]:
        """Raw tensors -> latents in the user's layout, batched over instances of equal shape.
        A frozen encoder runs in eval mode without grad, so it never changes."""
        if not self.has_encoder[modality]:
            return [data for _, _, data in entries]
        encoder = self.encoders[modality]
        device = next(self.projections[modality].parameters()).device
        by_shape = defaultdict(list)
        for position, (_, _, data) in enumerate(entries):
            by_shape[tuple(data.shape)].append(position)
        outputs = [None] * len(entries)
        for shape, positions in by_shape.items():
            stacked = torch.stack([entries[p][2] for p in positions]).to(device)
            where = ', '.join(f'sample {entries[p][0]} item {entries[p][1]}' for p in positions[:3])
            try:
                encoded = self._run_coder(encoder, stacked, trainable = self.train_encoders)
            except Exception as error:
                raise ValueError(f'{where}: modality {modality} encoder failed on input of shape {shape}: {error}') from error
            if not torch.is_tensor(encoded) or encoded.shape[:1] != stacked.shape[:1]:
                got = f'shape {tuple(encoded.shape)}' if torch.is_tensor(encoded) else type(encoded).__name__
                raise TypeError(f'{where}: modality {modality} encoder must return one latent tensor per input, batched like '
                                f'its input {tuple(stacked.shape)}; got {got}')
            if not encoded.is_floating_point():   # complex is not floating: its imaginary part would be dropped
                raise TypeError(f'{where}: modality {modality} encoder must return real floating latents, got {encoded.dtype}')
            for p, latent in zip(positions, encoded.unbind(0)):
                outputs[p] = latent
        return outputs

    def full_precision_layers(self) -> list[nn.Linear]:
        """The layers run by full_precision_linear: the time MLP and the latent projections."""
        time_mlp = [m for m in self.time_embedding.mlp if isinstance(m, nn.Linear)] if self.time_embedding is not None else []
        return time_mlp + [layer for p in self.projections if p.unet is None for layer in (p.proj_in, p.proj_out)]

    def decode(self, modality: int, latents: Tensor) -> Tensor:
        """Float['b ...'] latents in the user's layout -> decoded data (identity without a decoder)."""
        if not self.has_decoder[modality]:
            return latents
        return self._run_coder(self.decoders[modality], latents, trainable = False)

    @staticmethod
    def _run_coder(module: nn.Module, x: Tensor, trainable: bool) -> Tensor:
        if trainable:
            return module(x)
        with eval_mode(module), torch.no_grad():
            return module(x)

    def embed(self, modality: int, inputs: Tensor, shape: tuple[int, ...], token_time: Tensor) -> Tensor:
        """Instances of one `shape`: inputs Float['b L c'] (L = prod(shape)) and time embeddings
        broadcastable to Float['b l d'] -> tokens Float['b l d'] (l = L without a U-Net)."""
        parts = self.projections[modality]
        if parts.unet is None:
            return full_precision_linear(parts.proj_in, inputs) + token_time
        tokens, _ = parts.unet.encode(inputs, shape)
        return tokens + token_time

    def velocity(self, modality: int, hidden: Tensor, inputs: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Instances of one `shape`: hidden states Float['b l d'] -> velocities Float['b L c'].
        `inputs` are the network inputs the tokens came from (the U-Net recomputes its skip)."""
        parts = self.projections[modality]
        if parts.unet is None:
            return full_precision_linear(parts.proj_out, hidden)
        _, skip = parts.unet.encode(inputs, shape)
        return parts.unet.decode(hidden, skip, shape)

    def embed_group(self, modality: int, inputs: Tensor, shapes: list[tuple[int, ...]], token_time: Tensor) -> Tensor:
        """All instances of a modality in a packed batch, flattened: Float['L c'] -> Float['l d']."""
        if self.projections[modality].unet is None:
            return self.embed(modality, inputs, (), token_time)
        pieces = self._per_shape(inputs, shapes, lambda x, shape: self.embed(modality, x, shape, 0.))
        return torch.cat(pieces) + token_time

    def velocity_group(self, modality: int, hidden: Tensor, inputs: Tensor, shapes: list[tuple[int, ...]]) -> Tensor:
        """Float['l d'] hidden states of all instances of a modality -> Float['L c'] velocities."""
        if self.projections[modality].unet is None:
            return self.velocity(modality, hidden, inputs, ())
        spec = self.config.modalities[modality]
        token_counts = [math.prod(spec.token_shape(shape)) for shape in shapes]
        hidden_by_instance = list(hidden.split(token_counts))
        pieces = self._per_shape(inputs, shapes, lambda x, shape, h: self.velocity(modality, h, x, shape), hidden_by_instance)
        return torch.cat(pieces)

    @staticmethod
    def _per_shape(inputs: Tensor, shapes: list, fn, per_instance: list | None = None) -> list[Tensor]:
        """Apply fn batched over instances of equal shape; returns per-instance flattened results."""
        sizes = [math.prod(shape) for shape in shapes]
        chunks = inputs.split(sizes)
        by_shape = defaultdict(list)
        for i, shape in enumerate(shapes):
            by_shape[tuple(shape)].append(i)
        out = [None] * len(shapes)
        for shape, members in by_shape.items():
            args = [torch.stack([chunks[i] for i in members])]
            if per_instance is not None:
                args.append(torch.stack([per_instance[i] for i in members]))
            result = fn(args[0], shape, *args[1:])
            for i, row in zip(members, result):
                out[i] = row
        return out

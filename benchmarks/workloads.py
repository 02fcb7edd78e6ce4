"""Benchmark workloads for `transfusion_pytorch`: ours and the peer (transfusion-pytorch==0.20.0).

The per-side settings, the sizes, and the four workloads as tasks. Both libraries have the
import name `transfusion_pytorch`, so no process ever sees both: `worker.py` runs one workload
for one side and prints JSON; `run.py` starts workers under each side's interpreter.

Workloads (each is a function `(model, cfg) -> Task`; `Task.step` is what gets timed):

    mixed_train     one optimizer step on a batch of interleaved samples
                    text + latent + text + latent + text (text = randint(0, 256), latent =
                    randn(n, dim_latent)): forward loss, backward, AdamW step.
                    Throughput counts text + latent tokens only (not the special/meta tokens
                    each library adds). Also: peak memory, FLOPs per token of forward+backward.
    text_train      the same step on a text-only batch `model(randint(0, 256, (b, n)))`.
    gen_text        `generate_text_only(prompt (1, 1), seq_len = 1 + new_tokens,
                    temperature = 1., min_p = 0.1, cache_kv = True)`: new tokens per second.
    gen_modality    `generate_modality_only(batch_size = 1, modality_type = 0,
                    fixed_modality_shape = (n,), modality_steps = MODALITY_STEPS[side])`: seconds per sample, and
                    the network function evaluations (NFE) counted with a forward pre-hook on
                    `model.transformer` during one extra, untimed call, and the forward FLOPs
                    of that call per latent token.
    matmul_peak     the card's matmul peak (bf16 8192^3 on CUDA, fp32 2048^3 on CPU), for MFU.

Precision: bf16 autocast on CUDA (fp32 master weights), plain fp32 on CPU, for both sides;
`cfg['cpu_bf16']` (the worker's `--cpu-bf16`) puts both sides under bf16 autocast on CPU too,
and the CPU matmul peak is then measured in bf16.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault('TQDM_DISABLE', '1')  # the peer's generate_text_only wraps its loop in tqdm
os.environ.pop('TYPECHECK', None)           # the peer's optional runtime type checking stays off

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_VERSION = '0.20.0'

# ---------------------------------------------------------------------------------------------
# Per-side settings: the ONE place to change what each library is asked to do.
# Keys are merged (recursively, dicts into dicts) into the constructor kwargs built in
# `build_model`; 'cpu' / 'cuda' pick by device. `run.py --ours-kwargs JSON` overrides too.

OURS_FAST_KWARGS = {
    # compiled blocks, and the whole stack as one region: measured faster on 2 cores for both
    # trainings and modality generation (text decoding compiles its own step). A C++ launch
    # wrapper: modality generation 120 -> 111 ms, the trainings unchanged (in one process,
    # alternating, 30 and 10 calls)
    'cpu': {'transformer': {'compile_blocks': True, 'compile_stack': True, 'compile_options': {'cpp_wrapper': True}}},
    # compiled blocks; CUDA-graph text decoding; the feed-forward padded 2730 -> 2736 wide: on an
    # H200 its products ran at 635 instead of 212 TFLOP/s; mixed training took 49.7 ms a step without
    # it and 45.7 ms with it, in two calls on the same machine (results/h200_s3_*)
    'cuda': {'transformer': {'compile_blocks': True, 'ff_pad_multiple': 16}},
}

# Merged after OURS_FAST_KWARGS for one (device, workload). Mixed training on CUDA is bound by
# the host issuing kernels: the whole stack compiled as one region, replayed as CUDA graphs, took
# 44.6 ms a step against 55.2 ms per block in one process on an H200, and 33.8-34.6 ms in the
# workers (results/h200_s4_*). Its CUDA-graph pool is reserved, not allocated, memory: the worker
# reports both.
OURS_WORKLOAD_KWARGS = {
    ('cuda', 'mixed_train'): {'transformer': {'compile_stack': True, 'compile_options': {'triton.cudagraphs': True}}},
}

PEER_BEST_KWARGS = {
    'cpu': {},
    'cuda': {'transformer': {'use_flex_attn': True}},  # the peer's documented fast path on CUDA
}

# If the peer's first warm-up call fails with its best settings (e.g. flex attention with the
# fp32 queries/keys its qk-RMSNorm makes under bf16 autocast), the worker rebuilds the peer
# with these merged in, records why in `fallback`, and goes on: a GPU run is one shot.
PEER_FALLBACK_KWARGS = {
    'cpu': None,
    'cuda': {'transformer': {'use_flex_attn': False}},
}

# Likewise for ours: if compilation fails on the lent machine's torch, measure eager.
OURS_FALLBACK_KWARGS = {
    'cpu': None,
    'cuda': {'transformer': {'compile_blocks': False}},
}

# What `modality_steps` each side is given. The peer integrates on torch.linspace(0, 1, steps)
# with torchdiffeq's midpoint method: steps - 1 intervals, 2 evaluations each (30 NFE for 16).
# Set ours so that the NFE printed by run.py match (equal work).
MODALITY_STEPS = {'ours': 15, 'peer': 16}  # ours: 15 midpoint steps = 30 NFE, as the peer's 16 grid points

# module called once per ODE function evaluation (dotted path). Ours: the output projection of
# the modality's latents, which only ODE evaluations call here (the transformer also encodes the
# 4-token prompt once, not an NFE; the time embedding runs once per solve, for all its times).
NFE_MODULE_ATTR = {'ours': 'modalities.projections.0.proj_out', 'peer': 'transformer'}

SIZES = {
    # small enough for 2 CPU cores: the whole CPU benchmark takes a few minutes
    'cpu': dict(
        transformer=dict(dim=256, depth=4, heads=4, dim_head=64),
        dim_latent=64, num_text_tokens=256,
        mixed_batch=4, mixed_lengths=(64, 128, 64, 128, 32),  # text, latent, text, latent, text
        text_batch=4, text_len=512,
        gen_new_tokens=128,
        modality_len=64,
        warmup=dict(mixed_train=1, text_train=1, gen_text=1, gen_modality=1, matmul_peak=2),
    ),
    'gpu': dict(
        transformer=dict(dim=1024, depth=12, heads=16, dim_head=64),
        dim_latent=64, num_text_tokens=256,
        mixed_batch=8, mixed_lengths=(128, 256, 128, 256, 64),
        text_batch=8, text_len=2048,
        gen_new_tokens=256,
        modality_len=256,
        warmup=dict(mixed_train=3, text_train=3, gen_text=2, gen_modality=2, matmul_peak=3),
    ),
}


@dataclass
class Task:
    """What a workload hands the timer: `step` is timed; `work` is counted per step in `unit`."""
    step: Callable[[], object]
    work: float
    unit: str                                   # 'tok' (report work / s) or 'sample' (report s)
    flop_step: Callable[[], None] | None = None  # forward + backward for the FLOP count
    flop_tokens: int = 0
    info: dict = field(default_factory=dict)
    count_step: Callable[[], object] | None = None   # gen_modality: the call NFE and FLOPs are counted on


# ---------------------------------------------------------------------------------------------
# helpers

def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA; on CPU fp32, or bf16 autocast when asked (`cpu_bf16`)."""
    if device.type == 'cuda' or cpu_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def force_eager():
    """Run torch.compile'd code eagerly (FLOP counting, hooks); no-op on old torch."""
    set_stance = getattr(torch.compiler, 'set_stance', None)
    return set_stance('force_eager') if set_stance else nullcontext()


def check_side(side: str, module) -> dict:
    """Fail loudly if the interpreter imported the wrong `transfusion_pytorch`."""
    import importlib.metadata as md
    path = Path(module.__file__ or next(iter(module.__path__))).resolve()  # __file__: None if no __init__
    in_repo = REPO_ROOT / 'transfusion_pytorch' in (path, path.parent)
    try:
        version = md.version('transfusion-pytorch')
    except md.PackageNotFoundError:
        version = None
    if side == 'peer' and (in_repo or version != PEER_VERSION):
        raise RuntimeError(f'--side peer imported {path} (version {version}); expected the PyPI {PEER_VERSION}')
    if side == 'ours' and not in_repo:
        raise RuntimeError(f'--side ours imported {path}, not {REPO_ROOT / "transfusion_pytorch"}')
    return dict(library_file=str(path), library_version=version if side == 'peer' else 'repo')


# ---------------------------------------------------------------------------------------------
# model

def build_model(side: str, cfg: dict, device: torch.device, extra_kwargs: dict | None = None,
                workload: str | None = None):
    """Same shapes on both sides; each side gets its own fast/best settings merged in (ours also
    those for `workload` on this device)."""
    import transfusion_pytorch
    info = check_side(side, transfusion_pytorch)

    t = cfg['transformer']
    common = dict(num_text_tokens=cfg['num_text_tokens'], dim_latent=cfg['dim_latent'],
                  modality_default_shape=(cfg['modality_len'],))
    if side == 'ours':
        kwargs = dict(common, transformer=dict(t, ff_mult=4.0))
        kwargs = deep_merge(kwargs, OURS_FAST_KWARGS[device.type])
        kwargs = deep_merge(kwargs, OURS_WORKLOAD_KWARGS.get((device.type, workload), {}))
    else:
        # the peer's FeedForward is GEGLU with hidden int(dim * 4 * 2 / 3), as ours with ff_mult 4
        kwargs = dict(common, transformer=dict(t, ff_expansion_factor=4))
        kwargs = deep_merge(kwargs, PEER_BEST_KWARGS[device.type])
    kwargs = deep_merge(kwargs, extra_kwargs or {})

    torch.manual_seed(0)
    model = transfusion_pytorch.Transfusion(**kwargs).to(device)
    info.update(constructor_kwargs=kwargs, params=sum(p.numel() for p in model.parameters()))
    return model, info


# ---------------------------------------------------------------------------------------------
# workloads

def make_train_task(model, cfg, batch, flop_batch, tokens: int, flop_tokens: int) -> Task:
    """forward loss + backward + AdamW step, the same for both sides."""
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')

    def forward_backward(b):
        with autocast(device, cfg.get('cpu_bf16', False)):
            loss = model(b)
        loss.backward()

    def step():
        forward_backward(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def flop_step():
        forward_backward(flop_batch)
        optimizer.zero_grad(set_to_none=True)

    return Task(step, tokens, 'tok', flop_step, flop_tokens)


def mixed_train(model, cfg) -> Task:
    device, gen = next(model.parameters()).device, torch.Generator().manual_seed(1)

    def sample():
        items = []
        for i, n in enumerate(cfg['mixed_lengths']):
            if i % 2 == 0:
                items.append(torch.randint(0, 256, (n,), generator=gen).to(device))
            else:
                items.append(torch.randn(n, cfg['dim_latent'], generator=gen).to(device))
        return items

    batch = [sample() for _ in range(cfg['mixed_batch'])]
    per_sample = sum(cfg['mixed_lengths'])
    task = make_train_task(model, cfg, batch, [sample()], per_sample * len(batch), per_sample)
    task.info = dict(batch=cfg['mixed_batch'], lengths=list(cfg['mixed_lengths']))
    return task


def text_train(model, cfg) -> Task:
    device, gen = next(model.parameters()).device, torch.Generator().manual_seed(2)
    b, n = cfg['text_batch'], cfg['text_len']
    batch = torch.randint(0, 256, (b, n), generator=gen).to(device)
    task = make_train_task(model, cfg, batch, batch[:1], b * n, n)
    task.info = dict(batch=b, seq_len=n)
    return task


def gen_text(model, cfg) -> Task:
    device, n = next(model.parameters()).device, cfg['gen_new_tokens']
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)

    def step():
        with autocast(device, cfg.get('cpu_bf16', False)):
            return model.generate_text_only(prompt, 1 + n, temperature=1.0, min_p=0.1, cache_kv=True)

    return Task(step, n, 'tok', info=dict(prompt=[1, 1], new_tokens=n, seq_len=1 + n))


def gen_modality(model, cfg) -> Task:
    device, n, steps = next(model.parameters()).device, cfg['modality_len'], MODALITY_STEPS[cfg['side']]
    model.eval()

    def step(**options):
        with autocast(device, cfg.get('cpu_bf16', False)):
            return model.generate_modality_only(batch_size=1, modality_type=0,
                                                fixed_modality_shape=(n,), modality_steps=steps, **options)

    # counting NFE and FLOPs needs every evaluation to run its modules: ours replays CUDA graphs
    # on a GPU (hooks and FlopCounterMode see only the capture), so it counts an eager call
    eager = dict(cuda_graphs=False) if cfg['side'] == 'ours' else {}
    return Task(step, 1, 'sample', info=dict(latent_tokens=n, modality_steps=steps), count_step=lambda: step(**eager))


def matmul_peak(device: torch.device, warmup: int, repeats: int, cpu_bf16: bool = False) -> dict:
    """Median FLOP/s of a square matmul: bf16 8192^3 on CUDA, 2048^3 on CPU (fp32, or bf16)."""
    n, dtype = (8192, torch.bfloat16) if device.type == 'cuda' else (2048, torch.bfloat16 if cpu_bf16 else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    repeats = max(repeats, 20)  # one matmul is short: more repeats cost nothing
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return dict(n=n, dtype=str(dtype), times_s=times, peak_flops=2 * n ** 3 / statistics.median(times))


WORKLOADS = dict(mixed_train=mixed_train, text_train=text_train, gen_text=gen_text, gen_modality=gen_modality)

"""Pieces shared by the example scripts: their common command-line options, process-group setup
for torchrun, the training loop with its progress bar, checkpoints, the loss-curve figure and
the metrics file.

The examples run unchanged as `python examples/<script>.py` (one process) and as
`torchrun --nproc_per_node=N examples/<script>.py` (DistributedDataParallel over gloo on CPU,
NCCL on GPUs); only rank 0 shows progress and writes outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Distributed:
    """Where this process stands among the torchrun workers (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE set), else run alone."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend = backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    return Distributed(rank = dist.get_rank(), world_size = dist.get_world_size())


def teardown_distributed(env: Distributed) -> None:
    if env.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def wrap_for_training(model: nn.Module, env: Distributed) -> nn.Module:
    """DDP around the model under torchrun. Transfusion's loss touches every parameter in every
    batch (see `objective.unused_parameter_anchor`), so DDP needs no find_unused_parameters."""
    if not env.active:
        return model
    device_ids = [model.device.index] if model.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids = device_ids)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: nn.Module, make_batch: Callable[[int], object], *, steps: int, lr: float, env: Distributed,
          warmup: int = 100, weight_decay: float = 0.01, clip: float = 1.,
          on_step: Callable[[int], None] | None = None) -> tuple[list[float], float]:
    """Train `model` (a Transfusion) for `steps` AdamW steps on `make_batch(step)`, this rank's
    share of the batch. Returns the per-step loss averaged over ranks, and the wall time."""
    trained = wrap_for_training(model, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr = lr, betas = (0.9, 0.99), weight_decay = weight_decay)
    losses = []
    model.train()
    start = time.perf_counter()
    with tqdm(range(steps), disable = not env.is_main, desc = 'training', dynamic_ncols = True) as progress:
        for step in progress:
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step, steps, lr, warmup)
            loss = trained(make_batch(step))
            optimizer.zero_grad(set_to_none = True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if on_step is not None:
                on_step(step)
            value = loss.detach()
            if env.active:
                dist.all_reduce(value)
                value = value / env.world_size
            losses.append(value.item())
            # a running mean keeps the bar readable; the curve keeps every step
            recent = losses[-50:]
            progress.set_postfix(loss = f'{sum(recent) / len(recent):.4f}')
    return losses, time.perf_counter() - start


def save_checkpoint(model: nn.Module, folder: Path) -> Path:
    """`model.save_pretrained` into `folder`/checkpoint; load it back with
    `Transfusion.from_pretrained(path)`."""
    target = folder / 'checkpoint'
    model.save_pretrained(target)
    return target


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(losses: list[float], path: Path, title: str, ylabel: str = 'training loss') -> None:
    """Per-step loss (faint) and its moving average."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize = (6, 3.5), dpi = 100)
    steps = range(1, len(losses) + 1)
    axis.plot(steps, losses, alpha = 0.3, linewidth = 0.8, label = 'per step')
    axis.plot(steps, moving_average(losses, max(1, len(losses) // 50)), linewidth = 1.5, label = 'moving average')
    axis.set_xlabel('step')
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_facts(args, env: Distributed, model: nn.Module, seconds: float, losses: list[float]) -> dict:
    """What every example's metrics.json records about the run: time, schedule, workers, size,
    and the mean training loss over the last 50 steps."""
    return dict(training_seconds = seconds, steps = args.steps, batch_size = args.batch_size, workers = env.world_size,
                threads_per_worker = torch.get_num_threads(), parameters = sum(p.numel() for p in model.parameters()),
                final_loss = sum(losses[-50:]) / len(losses[-50:]))


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent = 2) + '\n')


def training_parser(description: str, *, steps: int, batch_size: int, batch_unit: str, lr: float) -> argparse.ArgumentParser:
    """A parser with the options every training example has: schedule and model size. The
    script adds its own, then calls `parse_with_smoke`."""
    p = argparse.ArgumentParser(description = description, formatter_class = argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type = int, default = steps, help = 'optimizer steps')
    p.add_argument('--batch-size', type = int, default = batch_size, help = f'{batch_unit} per step, over all workers')
    p.add_argument('--lr', type = float, default = lr)
    p.add_argument('--warmup', type = int, default = 100)
    p.add_argument('--dim', type = int, default = 128)
    p.add_argument('--depth', type = int, default = 4)
    p.add_argument('--heads', type = int, default = 4, help = 'attention heads (head width dim / heads)')
    return p


def parse_with_smoke(p: argparse.ArgumentParser, argv: list[str] | None, output: Path, smoke: dict) -> argparse.Namespace:
    """Add the run options (seed, threads, output folder, --smoke) and parse; --smoke replaces
    the settings in `smoke` with tiny ones, for the tests."""
    p.add_argument('--seed', type = int, default = 0)
    p.add_argument('--threads', type = int, default = None, help = 'torch threads per process')
    p.add_argument('--output', type = Path, default = output)
    p.add_argument('--smoke', action = 'store_true', help = 'a few steps with tiny settings (tests)')
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    return args


def set_threads(threads: int | None) -> None:
    """Cap intra-op threads; under torchrun each worker defaults to one so workers don't fight."""
    if threads is None and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def launch(args, run):
    """Call run(args, env) inside a process group when launched by torchrun (plain otherwise),
    with args.threads torch threads; returns run's result (None on ranks other than 0)."""
    set_threads(args.threads)
    env = setup_distributed()
    try:
        return run(args, env)
    finally:
        teardown_distributed(env)


def launch_and_report(args, run, report) -> None:
    """launch(args, run), then print report(metrics) on the process that has the metrics."""
    metrics = launch(args, run)
    if metrics is not None:
        print(report(metrics))

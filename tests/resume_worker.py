"""A small training run shared by tests/test_checkpoint.py and the fresh process that resumes it.

    python tests/resume_worker.py CHECKPOINT_DIR STOP_STEP THREADS OUT_DIR

rebuilds model, optimizer, scheduler and EMA from the training state in CHECKPOINT_DIR, trains up
to STOP_STEP, and writes the losses to OUT_DIR/losses.json and the EMA model to OUT_DIR/ema.
Randomness is everywhere the library has it (times, noise, dropout, condition dropout), so an
exact continuation needs the RNG states as well as the weights and optimizer.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.checkpoint import load_config, load_training_state, make_ema, save_pretrained


@dataclass
class Run:
    model: Transfusion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel


def make_model() -> Transfusion:
    return Transfusion(
        num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2, 3), (3,)),
        time_conditioning = 'adaptive', condition_dropout = 0.2,
        transformer = dict(dim = 32, depth = 2, heads = 2, dim_head = 16, dropout = 0.1),
    )


def training_run(model: Transfusion) -> Run:
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3, weight_decay = 0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor = 0.25, total_iters = 4)
    return Run(model, optimizer, scheduler, make_ema(model, decay = 0.9))


def batch_at(step: int) -> list:
    """The data of a step depends on the step only, as with a resumable data loader."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = lambda n: torch.randint(0, 16, (n,), generator = g)
    return [[ids(4), torch.randn(2, 3, 8, generator = g), ids(3)], [(1, torch.randn(3, 4, generator = g)), ids(5)]]


def train(run: Run, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        loss = run.model(batch_at(step))          # times, noise and dropout from the global RNG
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        run.ema.update_parameters(run.model)
        losses.append(loss.item())
    return losses


def resume(checkpoint: Path, stop: int, out: Path) -> None:
    torch.manual_seed(12345)                      # differs from the run's: only restored RNG can match
    run = training_run(Transfusion.from_config(load_config(checkpoint)))
    state = load_training_state(checkpoint, run.model, run.optimizer, ema = run.ema, scheduler = run.scheduler)
    losses = train(run, state.step, stop)
    out.mkdir(parents = True, exist_ok = True)
    (out / 'losses.json').write_text(json.dumps(losses))
    save_pretrained(run.ema, out / 'ema')


if __name__ == '__main__':
    torch.set_num_threads(int(sys.argv[3]))       # same reduction order as the straight run
    resume(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[4]))

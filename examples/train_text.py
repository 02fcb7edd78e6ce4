"""Character-level language modelling with Transfusion's text-only path, on text every Python
install has offline: the standard library's own source files.

Characters are ASCII code points (128 text tokens; the rare non-ASCII character becomes token 0,
which ASCII source never uses otherwise). Files are split into train and held-out by a hash of
their path, so no held-out file is ever seen in training. Reported: bits per character on
held-out text (and a unigram baseline for scale), in the output folder (rank 0):

    metrics.json   held-out bits per character, unigram baseline, training time and steps
    loss.png       the training loss curve (bits per character)
    sample.txt     a continuation of the prompt 'def ' (temperature 0.5), to read
    checkpoint/    `save_pretrained` output (`Transfusion.from_pretrained` loads it)

    python examples/train_text.py                          # defaults: a few minutes on 2 cores
    torchrun --nproc_per_node=2 examples/train_text.py     # DDP over gloo on CPU
    python examples/train_text.py --smoke                  # seconds, tiny settings (CI)
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also under torchrun

from common import (Distributed, default_device, launch_and_report, plot_loss_curve, save_checkpoint,  # noqa: E402
                    parse_with_smoke, run_facts, train, training_parser, write_json)
from transfusion_pytorch import Transfusion  # noqa: E402

VOCAB = 128
SMOKE = dict(steps = 20, batch_size = 8, seq_len = 64, dim = 32, depth = 1, train_chars = 200_000,
             eval_chars = 5_000, warmup = 5, sample_length = 64)


def parse_args(argv = None) -> argparse.Namespace:
    p = training_parser(__doc__, steps = 1000, batch_size = 32, batch_unit = 'sequences', lr = 2e-3)
    p.add_argument('--seq-len', type = int, default = 128)
    p.add_argument('--train-chars', type = int, default = 4_000_000, help = 'characters of training text to load')
    p.add_argument('--eval-chars', type = int, default = 100_000, help = 'held-out characters to score')
    p.add_argument('--sample-length', type = int, default = 124, help = 'characters to sample (at most seq-len minus the prompt)')
    return parse_with_smoke(p, argv, Path('outputs/text'), SMOKE)


def stable_hash(text: str) -> int:
    """crc32: the same on every run and machine, unlike Python's salted hash()."""
    return zlib.crc32(text.encode())


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py sources, without tests and installed
    packages, in a fixed shuffled order so that a character budget samples the whole library
    rather than its alphabetical beginning."""
    root = Path(sysconfig.get_paths()['stdlib'])
    skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'}
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob('*.py')]
    files = [(name, p) for name, p in files if not skip & set(name.split('/')[:-1])]
    return sorted(files, key = lambda entry: (stable_hash('order:' + entry[0]), entry[0]))


def is_held_out(name: str) -> bool:
    """About one file in ten, chosen by a stable hash of its relative path."""
    return stable_hash(name) % 10 == 0


def encode(text: str) -> torch.Tensor:
    codes = torch.tensor(list(text.encode('ascii', errors = 'replace')), dtype = torch.long)
    # 'replace' writes '?' for non-ASCII; token 0 marks it instead, so '?' keeps its meaning
    unknown = torch.tensor([ord(c) >= VOCAB for c in text])
    return codes.masked_fill(unknown, 0)


def load_corpus(train_chars: int, eval_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Int['n'] train and held-out character streams, files joined by blank lines."""
    streams = {True: [], False: []}
    sizes = {True: 0, False: 0}
    limits = {True: eval_chars, False: train_chars}
    for name, path in stdlib_files():
        held_out = is_held_out(name)
        if sizes[held_out] >= limits[held_out]:
            if all(sizes[k] >= limits[k] for k in limits):
                break
            continue
        text = path.read_text(encoding = 'utf-8', errors = 'replace') + '\n\n'
        streams[held_out].append(text)
        sizes[held_out] += len(text)
    join = lambda parts, limit: encode(''.join(parts)[:limit])
    return join(streams[False], train_chars), join(streams[True], eval_chars)


class Windows:
    """Random training windows; step s draws the same global batch on every worker (seeded by
    (seed, s)) and each worker keeps its slice."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int, env: Distributed):
        if batch_size % env.world_size:
            raise ValueError(f'--batch-size {batch_size} must be divisible by the number of workers {env.world_size}')
        self.stream, self.seq_len, self.batch_size, self.seed, self.env = stream, seq_len, batch_size, seed, env

    def __call__(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch_size,), generator = generator)
        share = self.batch_size // self.env.world_size
        starts = starts[self.env.rank * share:(self.env.rank + 1) * share]
        return torch.stack([self.stream[s:s + self.seq_len] for s in starts.tolist()])


@torch.no_grad()
def bits_per_char(model: Transfusion, stream: torch.Tensor, seq_len: int, batch: int = 32) -> float:
    """Held-out bits per character: windows of seq_len overlapping by one character, so every
    character after the first is predicted exactly once (from at most seq_len - 1 before it)."""
    model.eval()
    step = seq_len - 1
    starts = list(range(0, len(stream) - seq_len + 1, step))
    total, count = 0., 0
    for i in range(0, len(starts), batch):
        windows = torch.stack([stream[s:s + seq_len] for s in starts[i:i + batch]]).to(model.device)
        logits = model.text_logits(windows)[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction = 'sum').item()
        count += windows[:, 1:].numel()
    return total / count / math.log(2)


def unigram_bits_per_char(train: torch.Tensor, held_out: torch.Tensor) -> float:
    """Cross-entropy of the held-out text under the training characters' frequencies (add-one
    smoothed): what a model that ignores context would score."""
    counts = torch.bincount(train, minlength = VOCAB).double() + 1
    log_p = (counts / counts.sum()).log2()
    return float(-log_p[held_out].mean())


def decode(ids: torch.Tensor) -> str:
    return ''.join(chr(i) if i else '\ufffd' for i in ids.tolist())


def write_sample(model: Transfusion, args: argparse.Namespace) -> str:
    prompt_text = 'def '
    prompt = encode(prompt_text)[None].to(model.device)
    torch.manual_seed(args.seed)
    # positions beyond the training length were never seen, so the sample stays within it
    length = min(len(prompt_text) + args.sample_length, args.seq_len)
    new = model.generate_text_only(prompt, length, temperature = 0.5)
    text = prompt_text + decode(new[0])
    (args.output / 'sample.txt').write_text(text + '\n')
    return text


def run(args: argparse.Namespace, env: Distributed | None = None) -> dict | None:
    env = env or Distributed()
    torch.manual_seed(args.seed * 1000 + env.rank)   # seeds' rank streams never overlap
    train_stream, held_out = load_corpus(args.train_chars, args.eval_chars)
    transformer = dict(dim = args.dim, depth = args.depth, heads = args.heads, dim_head = args.dim // args.heads)
    model = Transfusion(num_text_tokens = VOCAB, transformer = transformer).to(default_device())
    windows = Windows(train_stream, args.seq_len, args.batch_size, args.seed, env)
    losses, seconds = train(model, windows, steps = args.steps, lr = args.lr, env = env, warmup = args.warmup)
    if not env.is_main:
        return None
    args.output.mkdir(parents = True, exist_ok = True)
    plot_loss_curve([loss / math.log(2) for loss in losses], args.output / 'loss.png',
                    'character-level LM on Python stdlib sources', ylabel = 'training bits per character')
    checkpoint = save_checkpoint(model, args.output)
    facts = run_facts(args, env, model, seconds, losses)
    metrics = dict(
        bits_per_char = bits_per_char(model, held_out, args.seq_len),
        unigram_bits_per_char = unigram_bits_per_char(train_stream, held_out),
        final_train_bits_per_char = facts.pop('final_loss') / math.log(2), **facts, seq_len = args.seq_len,
        train_chars = len(train_stream), held_out_chars = len(held_out), checkpoint = str(checkpoint),
    )
    write_sample(model, args)
    write_json(metrics, args.output / 'metrics.json')
    return metrics


def main(argv = None) -> None:
    args = parse_args(argv)
    launch_and_report(args, run, lambda metrics: (
        f"held-out bits per character {metrics['bits_per_char']:.3f} (unigram baseline "
        f"{metrics['unigram_bits_per_char']:.3f}), training {metrics['training_seconds']:.0f} s "
        f"for {metrics['steps']} steps; outputs in {args.output}"))


if __name__ == '__main__':
    main()

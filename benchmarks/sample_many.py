"""Batched sampling with rows in different phases: ours only, for A/B of the sampler.

`sample_many` shares a forward among the rows in the same phase (text, one modality's ODE, an
instance's commit). Once rows drift apart (one row integrates an ODE while others emit text,
or has sampled EOS), a step runs on a subset of the rows: that path is what this measures. The
peer has no batched sampler whose rows move through phases independently, so there is no side
by side; compare commits by running this before and after a change, alternating.

The model is the CPU size of `workloads.py` with our CPU fast settings, untrained, so the text
it samples (and where it opens a modality or stops) is random but fixed by the seeds. The
script prints how many steps ran on all rows and how many on a subset, then the median time of
`--repeats` calls after one warm-up call.

    python benchmarks/sample_many.py                       # 8 rows, max_length 384; ~30 s on 2 cores
    python benchmarks/sample_many.py --rows 4 --max-length 256 --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/ is not a package)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type = int, default = 8, help = 'prompts sampled together')
    parser.add_argument('--max-length', type = int, default = 384, help = 'tokens per sample, as sample_many')
    parser.add_argument('--modality-steps', type = int, default = 8, help = 'midpoint steps per instance')
    parser.add_argument('--repeats', type = int, default = 5, help = 'timed calls (median reported)')
    return parser.parse_args()


def count_step_kinds(model, prompts: list, options: dict) -> dict[str, int]:
    """Steps that wrote the cache for all rows and for a subset, in one call."""
    from transfusion_pytorch import decoding
    counts = {'all rows': 0, 'subset': 0}
    persist = decoding.CachedRunner._persist

    def counting(runner, context):
        counts['subset' if context.subset is not None else 'all rows'] += 1
        return persist(runner, context)

    decoding.CachedRunner._persist = counting
    try:
        model.sample_many(prompts, **options)
    finally:
        decoding.CachedRunner._persist = persist
    return counts


def main() -> None:
    args = parse_args()
    cfg = workloads.SIZES['cpu']
    model, _ = workloads.build_model('ours', cfg, torch.device('cpu'))
    model.eval()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (args.rows,), generator = generator).tolist()
    prompts = [torch.randint(0, cfg['num_text_tokens'], (n,), generator = generator) for n in lengths]
    options = dict(max_length = args.max_length, modality_steps = args.modality_steps, seed = 0, show_progress = False)

    samples = model.sample_many(prompts, **options)   # warm-up: compilation
    print(f'{args.rows} rows, max_length {args.max_length}, items per sample {[len(s) for s in samples]}')
    print('cache writes per call:', count_step_kinds(model, prompts, options))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.sample_many(prompts, **options)
        seconds.append(time.perf_counter() - start)
    print(f'median {statistics.median(seconds):.3f} s per call; all: ' + ', '.join(f'{s:.3f}' for s in seconds))


if __name__ == '__main__':
    main()

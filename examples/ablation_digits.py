"""The paper's key ablations, reproduced small on the 8x8 digits (see train_digits.py):

- attention inside an image causal (raster order) instead of bidirectional;
- noise limiting for captioning off instead of on.

Each variant is the default train_digits run with one switch flipped, or both, for each seed; every run
keeps its own outputs (samples.png, metrics.json, ...) under --output/<variant>-seed<k>/, and the
summary goes to --output/ablation.json and a markdown table (--table).

    python examples/ablation_digits.py                      # 4 runs of the default length
    torchrun --nproc_per_node=2 examples/ablation_digits.py --seeds 0 1   # each run over 2 workers
    python examples/ablation_digits.py --smoke              # seconds (tests)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_digits  # noqa: E402
from common import Distributed, launch, write_json  # noqa: E402

VARIANTS = {
    'bidirectional, noise limit (default)': [],
    'causal image attention': ['--causal-image-attention'],
    'no noise limit': ['--no-noise-limit'],
    'causal image attention, no noise limit': ['--causal-image-attention', '--no-noise-limit'],
}

# (metrics key, column title, format); accuracy columns as percentages
COLUMNS = [
    ('label_accuracy', 'label acc., cfg 3 (%)', '{:.1f}'),
    ('label_accuracy_unguided', 'label acc., no cfg (%)', '{:.1f}'),
    ('frechet_distance_pca', 'FD-PCA, cfg 3', '{:.3f}'),
    ('frechet_distance_pca_unguided', 'FD-PCA, no cfg', '{:.3f}'),
    ('flow_loss', 'held-out flow loss', '{:.4f}'),
    ('caption_accuracy', 'caption acc. (%)', '{:.1f}'),
    ('caption_loss', 'held-out caption CE', '{:.4f}'),
    ('training_seconds', 'train time (s)', '{:.0f}'),
]
PERCENT = {'label_accuracy', 'label_accuracy_unguided', 'caption_accuracy'}


def parse_args(argv = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type = int, nargs = '+', default = [0])
    p.add_argument('--steps', type = int, default = None, help = 'optimizer steps per run (default: train_digits default)')
    p.add_argument('--threads', type = int, default = None)
    p.add_argument('--output', type = Path, default = Path('outputs/ablation'))
    p.add_argument('--table', type = Path, default = None, help = 'markdown table path (default: <output>/table.md)')
    p.add_argument('--smoke', action = 'store_true', help = 'tiny runs (tests)')
    return p.parse_args(argv)


def run_variants(args: argparse.Namespace, env: Distributed) -> list[dict] | None:
    """Every variant for every seed; each run uses all workers. The runs on rank 0, else None."""
    runs = []
    for name, flags in VARIANTS.items():
        for seed in args.seeds:
            folder = args.output / f"{'-'.join(f.strip('-') for f in flags) or 'default'}-seed{seed}"
            argv = [*flags, '--seed', str(seed), '--output', str(folder)]
            argv += ['--steps', str(args.steps)] if args.steps is not None else []
            argv += ['--smoke'] if args.smoke else []
            if env.is_main:
                print(f'== {name}, seed {seed}: train_digits.py {" ".join(argv)}', flush = True)
            metrics = train_digits.run(train_digits.parse_args(argv), env)
            runs.append(dict(variant = name, seed = seed, flags = flags, metrics = metrics))
    return runs if env.is_main else None


def cell(values: list[float], key: str, fmt: str) -> str:
    scale = 100. if key in PERCENT else 1.
    values = [v * scale for v in values]
    text = fmt.format(statistics.mean(values))
    if len(values) > 1:
        text += f' ({fmt.format(min(values))}-{fmt.format(max(values))})'
    return text


def markdown_table(runs: list[dict]) -> str:
    """One row per variant: the mean over seeds, with the range in parentheses when several."""
    seeds = sorted({r['seed'] for r in runs})
    steps = sorted({r['metrics']['steps'] for r in runs})
    lines = [f"| variant | {' | '.join(title for _, title, _ in COLUMNS)} |",
             '|' + '---|' * (len(COLUMNS) + 1)]
    for name in VARIANTS:
        chosen = [r['metrics'] for r in runs if r['variant'] == name]
        if chosen:
            lines.append(f"| {name} | {' | '.join(cell([m[k] for m in chosen], k, f) for k, _, f in COLUMNS)} |")
    judge = statistics.mean(r['metrics']['classifier_test_accuracy'] for r in runs)
    lines.append('')
    lines.append(f"{len(runs)} runs: seeds {', '.join(map(str, seeds))}; {', '.join(map(str, steps))} steps each; judge (SVC on real digits) "
                 f'held-out accuracy {100 * judge:.1f}%.')
    return '\n'.join(lines) + '\n'


def main(argv = None) -> None:
    args = parse_args(argv)
    runs = launch(args, run_variants)
    if runs is None:
        return
    args.output.mkdir(parents = True, exist_ok = True)
    write_json(runs, args.output / 'ablation.json')
    table = markdown_table(runs)
    path = args.table or args.output / 'table.md'
    path.parent.mkdir(parents = True, exist_ok = True)
    path.write_text(table)
    print(table)


if __name__ == '__main__':
    main()

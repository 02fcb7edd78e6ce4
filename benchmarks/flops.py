"""FLOPs per token of both sides at a benchmark size, counted on the CPU, untimed.

FLOPs do not depend on the device, so the GPU size can be counted here, on the CPU. On a GPU,
`run.py` cannot count them everywhere: FlopCounterMode fails on flex attention there.
On the CPU both sides attend densely, and attention counts as dense, as in `run.py`.

Each side runs in its own subprocess, `worker.py --flops-only`, under its own interpreter, as
in `run.py`:

    python benchmarks/flops.py --size gpu --json benchmarks/results/gpu_size_flops.json

Counted: forward + backward of a one-sample training batch for `mixed_train` and `text_train`.
For `gen_modality`, the forward FLOPs of one whole call per latent token, with its NFE.
`gen_text` has no count on either side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from run import HERE, REPO_ROOT, call_worker, default_python

COUNTED = ('mixed_train', 'text_train', 'gen_modality')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', choices=('cpu', 'gpu'), default='gpu')
    parser.add_argument('--workloads', nargs='+', choices=COUNTED, default=list(COUNTED))
    parser.add_argument('--ours-python', default=default_python(REPO_ROOT / '.venv'))
    parser.add_argument('--peer-python', default=default_python(HERE / '.peer-venv'))
    parser.add_argument('--json', help='write the workers\' results here')
    args = parser.parse_args()

    results = []
    print(f'size {args.size}, counted on the CPU')
    print(f"{'workload':14s} {'FLOP/tok ours':>14s} {'FLOP/tok peer':>14s} {'peer / ours':>11s} {'NFE ours':>8s} {'NFE peer':>8s}")
    for workload in args.workloads:
        count = ['--size', args.size, '--flops-only']
        ours = call_worker(args.ours_python, str(REPO_ROOT), 'ours', workload, count)
        peer = call_worker(args.peer_python, '', 'peer', workload, count)
        results += [ours, peer]
        flops = [r.get('flops_per_token') for r in (ours, peer)]
        ratio = flops[1] / flops[0] if all(flops) else None
        cells = [f'{f:.3g}' if f else 'failed' for f in flops] + [f'{ratio:.2f}' if ratio else '-']
        cells += [str(r.get('nfe', '-')) for r in (ours, peer)]
        print(f'{workload:14s} {cells[0]:>14s} {cells[1]:>14s} {cells[2]:>11s} {cells[3]:>8s} {cells[4]:>8s}', flush=True)
        for r in (ours, peer):
            if 'error' in r:
                print(f"    {r['side']}: {r['error'][-300:]}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size=args.size, results=results), indent=1))


if __name__ == '__main__':
    main()

"""Side-by-side benchmark of our `transfusion_pytorch` against the peer (transfusion-pytorch==0.20.0).

Both libraries import as `transfusion_pytorch`, so each side runs in its own subprocess
(`benchmarks/worker.py --side ours|peer ...`) under its own interpreter / PYTHONPATH, and
prints one JSON line that this driver collects. Per workload the two sides ALTERNATE, on one
of two schedules (`--schedule`):

- `paired` (the CPU default; `paired.py`): each side's worker starts once and warms up, then
  for `--blocks` blocks the sides take turns (the first side flips each block), each making
  `--rewarm` untimed and `--repeats` timed calls while the other process waits. Each block
  also gives a speedup of its own, measured seconds apart, and the table prints their median.
- `rounds` (the GPU default): `--rounds` rounds of one fresh subprocess per side (ours, peer,
  peer, ours, ...), each doing its warm-up (excluded) and `--repeats` timed calls.

Reported figures are medians over all timed calls; `spread` is the range of the per-round
(per-block) medians.

Printed per workload: throughput (tokens/s for training and text generation; seconds per
sample for modality generation), speedup of ours over the peer (> 1: ours faster), FLOPs per
token of forward+backward (FlopCounterMode; a speedup from doing less work shows up here),
MFU against the measured matmul peak, peak memory, and for modality generation the network
function evaluations (NFE) each side did, which must match for a fair comparison.

    bash benchmarks/setup_peer.sh                       # once: benchmarks/.peer-venv
    python benchmarks/run.py --size cpu                 # both sides, CPU size
    python benchmarks/run.py --size cpu --only peer     # the peer alone
    bash benchmarks/gpu.sh                              # on the lent GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from paired import ServedWorker, block_speedups, run_paired, worker_environment

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORKER = HERE / 'worker.py'
WORKLOADS = ('mixed_train', 'text_train', 'gen_text', 'gen_modality')
DEFAULTS = {'cpu': dict(schedule='paired', repeats=3, rounds=2, blocks=8, rewarm=1),
            'gpu': dict(schedule='rounds', repeats=5, rounds=1, blocks=4, rewarm=1)}


def default_python(venv: Path) -> str:
    exe = venv / 'bin' / 'python'
    return str(exe) if exe.exists() else sys.executable


def call_worker(python: str, pythonpath: str, side: str, workload: str, worker_args: list[str],
                timeout: float | None = None) -> dict:
    """Run `worker.py --side side --workload workload *worker_args` under `python` with only
    `pythonpath` on PYTHONPATH; returns its JSON (or an error record with the stderr tail)."""
    env = worker_environment(pythonpath)
    cmd = [python, str(WORKER), '--side', side, '--workload', workload, *worker_args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        stdout, stderr, rc = err.stdout or '', err.stderr or '', 'timeout'
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    lines = [line for line in stdout.splitlines() if line.startswith('BENCH_JSON ')]
    result = json.loads(lines[-1][len('BENCH_JSON '):]) if lines else \
        dict(side=side, workload=workload, error=f'worker exit {rc}, no result')
    result['wall_s'] = time.perf_counter() - started
    if 'error' in result:
        result['stderr_tail'] = stderr[-3000:]
    return result


def worker_arguments(args, side: str, flops: bool) -> list[str]:
    worker_args = ['--size', args.size, '--repeats', str(args.repeats)]
    kwargs = args.ours_kwargs if side == 'ours' else args.peer_kwargs
    if kwargs:
        worker_args += ['--kwargs', kwargs]
    if not flops:
        worker_args.append('--no-flops')
    if args.cpu_bf16:
        worker_args.append('--cpu-bf16')
    return worker_args


def side_interpreter(args, side: str) -> tuple[str, str]:
    """The side's python and PYTHONPATH."""
    if side == 'ours':
        return args.ours_python, args.ours_pythonpath
    return args.peer_python, args.peer_pythonpath


def run_worker(args, side: str, workload: str, flops: bool) -> dict:
    """One timed subprocess, within what is left of `--budget`."""
    worker_args = worker_arguments(args, side, flops)
    timeout = args.timeout
    if args.budget:
        timeout = min(timeout, args.budget - (time.perf_counter() - args.t0))
        if timeout < 15:
            return dict(side=side, workload=workload, error='skipped: --budget spent', wall_s=0.0, stderr_tail='')
    python, pythonpath = side_interpreter(args, side)
    return call_worker(python, pythonpath, side, workload, worker_args, timeout)


def summarize(runs: list[dict]) -> dict | None:
    """Median over every timed call of every round of one side."""
    good = [r for r in runs if 'times_s' in r]
    if not good:
        return None
    times = [t for r in good for t in r['times_s']]
    first = good[0]
    med = statistics.median(times)
    round_meds = [m for r in good for m in r.get('block_medians') or [statistics.median(r['times_s'])]]
    rate = first['work_per_step'] / med
    value = rate if first['unit'] == 'tok' else med
    spread = sorted(first['work_per_step'] / m if first['unit'] == 'tok' else m for m in round_meds)
    flops = next((r['flops_per_token'] for r in good if r.get('flops_per_token')), None)
    return dict(value=value, unit='tok/s' if first['unit'] == 'tok' else 's/sample',
                median_s=med, spread=[spread[0], spread[-1]], n_times=len(times),
                flops_per_token=flops, peak_mem_mib=max((r.get('peak_mem_mib') or 0) for r in good),
                peak_reserved_mib=max((r.get('peak_reserved_mib') or 0) for r in good) or None,
                mem_kind=first.get('mem_kind'), nfe=first.get('nfe'), params=first.get('params'),
                fallback=first.get('fallback'), tok_per_s=rate if first['unit'] == 'tok' else None)


def fmt(x, spec='.3g'):
    return '-' if x is None else format(x, spec)


def print_table(summary: dict, peak: float | None, sides: list[str]):
    head = ['workload', 'metric'] + [f'{s}' for s in sides] + (['speedup', 'per block'] if len(sides) == 2 else []) \
        + [f'FLOP/tok {s}' for s in sides] + [f'MFU {s}' for s in sides] \
        + [f'mem MiB {s}' for s in sides] + [f'reserved MiB {s}' for s in sides] + [f'NFE {s}' for s in sides]
    rows = []
    for workload, per_side in summary.items():
        ss = [per_side.get(s) for s in sides]
        unit = next((s['unit'] for s in ss if s), '-')
        row = [workload, unit] + [fmt(s and s['value'], '.4g') + ('' if s else ' (failed)') for s in ss]
        if len(sides) == 2:
            ours, peer = ss
            speed = None
            if ours and peer:
                speed = ours['value'] / peer['value'] if unit == 'tok/s' else peer['value'] / ours['value']
            row.append(fmt(speed, '.2f') + ('x' if speed else ''))
            blocks = per_side.get('block_speedups')
            row.append(f"{statistics.median(blocks):.2f}x [{min(blocks):.2f}-{max(blocks):.2f}]" if blocks else '-')
        row += [fmt(s and s['flops_per_token'], '.3g') for s in ss]
        mfus = [(s['flops_per_token'] * s['tok_per_s'] / peak) if (s and peak and s['flops_per_token'] and s['tok_per_s']) else None for s in ss]
        row += [fmt(m and 100 * m, '.1f') + ('%' if m else '') for m in mfus]
        row += [fmt(s and max(s['peak_mem_mib'], 0), '.0f') for s in ss]
        row += [fmt(s and s.get('peak_reserved_mib'), '.0f') for s in ss]
        row += [fmt(s and s['nfe'], 'd') if s and s['nfe'] is not None else '-' for s in ss]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ['-' * w for w in widths]] + rows:
        print('  '.join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def describe(results: list[dict]):
    """The sizes actually run, from the workers' own reports."""
    seen = set()
    for r in results:
        if 'model_config' in r and 'model' not in seen:
            seen.add('model')
            params = {x['side']: x['params'] for x in results if x.get('params') and x['workload'] == r['workload']}
            print(f"model: {r['model_config']}  (params: " + ', '.join(f'{s} {n / 1e6:.1f}M' for s, n in params.items()) + ')')
        if 'workload_config' in r and r['workload'] not in seen:
            seen.add(r['workload'])
            blocks = r.get('block_medians')
            timing = (f"paired: {len(blocks)} blocks of {r.get('rewarm', 0)} untimed + {r['repeats'] // max(len(blocks), 1)} timed calls" if blocks
                      else f"{r['repeats']} timed per run")
            print(f"{r['workload']}: {r['workload_config']}  (warm-up {r['warmup']}, {timing}, device {r.get('device_name', r['device'])}, torch {r['torch']}, threads {r['threads']})")
    for r in results:
        if r.get('fallback'):
            print(f"NOTE {r['side']} {r['workload']}: fell back to {r['fallback']['kwargs']}: {r['fallback']['reason']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', choices=('cpu', 'gpu'), default='cpu')
    p.add_argument('--workloads', nargs='+', choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument('--repeats', type=int, help='timed calls per subprocess (rounds; default 5) or per block (paired; default 3)')
    p.add_argument('--schedule', choices=('paired', 'rounds'), help='default: cpu paired, gpu rounds (see above)')
    p.add_argument('--rounds', type=int, help='rounds schedule: alternating subprocesses per side (default: cpu 2, gpu 1)')
    p.add_argument('--blocks', type=int, help='paired schedule: alternating blocks of calls (default 8 on cpu)')
    p.add_argument('--rewarm', type=int, help='paired schedule: untimed calls before each block (default 1)')
    p.add_argument('--only', choices=('ours', 'peer'), help='run one side alone')
    p.add_argument('--ours-python', default=default_python(REPO_ROOT / '.venv'))
    p.add_argument('--peer-python', default=default_python(HERE / '.peer-venv'))
    p.add_argument('--ours-pythonpath', default=str(REPO_ROOT), help='PYTHONPATH for ours (default: the repo)')
    p.add_argument('--peer-pythonpath', default='', help='PYTHONPATH for the peer (GPU: /tmp/peer_site)')
    p.add_argument('--ours-kwargs', default='', help='JSON merged into our constructor kwargs')
    p.add_argument('--peer-kwargs', default='', help='JSON merged into the peer constructor kwargs')
    p.add_argument('--cpu-bf16', action='store_true', help='CPU size: both sides under bf16 autocast (default fp32)')
    p.add_argument('--timeout', type=float, default=600, help='seconds per subprocess')
    p.add_argument('--budget', type=float, help='rounds schedule: total seconds; later subprocesses are cut short or skipped')
    p.add_argument('--no-peak', action='store_true', help='skip the matmul peak (no MFU)')
    p.add_argument('--json', help='write raw results and the summary here (rewritten after each workload)')
    args = p.parse_args()
    args.t0 = time.perf_counter()
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def start_served(args, side: str, workload: str) -> ServedWorker:
    python, pythonpath = side_interpreter(args, side)
    return ServedWorker(python, pythonpath, str(WORKER), str(REPO_ROOT), side, workload,
                        worker_arguments(args, side, flops=True))


def run_rounds(args, workload: str, sides: list[str], results: list[dict]) -> dict:
    """`args.rounds` alternating rounds of one workload; the runs per side."""
    per_side = {s: [] for s in sides}
    for rnd in range(args.rounds):
        for side in (sides if rnd % 2 == 0 else sides[::-1]):
            r = run_worker(args, side, workload, flops=rnd == 0)
            r['round'] = rnd
            results.append(r)
            per_side[side].append(r)
            status = f"ERROR {r['error']}" if 'error' in r else \
                f"median {statistics.median(r['times_s']) * 1e3:.1f} ms/call over {len(r['times_s'])}"
            print(f"[{workload} round {rnd} {side}] {status} ({r['wall_s']:.0f}s wall)", flush=True)
            if 'error' in r:
                print('    ' + r['stderr_tail'][-1500:].replace('\n', '\n    '), flush=True)
    return per_side


def report(args, summary: dict, results: list[dict], peak: float | None, sides: list[str]):
    print()
    describe(results)
    print()
    print_table(summary, peak, sides)
    nfes = {s: summary.get('gen_modality', {}).get(s) for s in sides}
    if len(sides) == 2 and all(nfes.values()) and nfes['ours']['nfe'] != nfes['peer']['nfe']:
        print(f"\nWARNING gen_modality does unequal work: NFE ours {nfes['ours']['nfe']} vs peer "
              f"{nfes['peer']['nfe']}; set MODALITY_STEPS in benchmarks/workloads.py so they match.")
    print('\nspeedup: ours over peer (> 1 = ours faster), from each side\'s median over all timed calls; '
          'per block (paired schedule): the median [range] of the speedups of single blocks; FLOP/tok: forward+backward of one training '
          'step (FlopCounterMode, attention counted dense), for gen_modality the forward FLOPs of one '
          'whole call per latent token; MFU: FLOP/tok x tok/s / matmul peak; '
          'mem: ' + ('CUDA max allocated (reserved: max reserved, CUDA-graph pools included)' if args.size == 'gpu' else 'CPU RSS high-water growth') + '; '
          'precision: ' + ('bf16 autocast' if args.size == 'gpu' or args.cpu_bf16 else 'fp32') + '.')


def main():
    args = parse_args()
    sides = [args.only] if args.only else ['ours', 'peer']
    results, summary, peak = [], {}, None

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(dict(args=vars(args), peak_flops=peak, summary=summary,
                                                       results=results), indent=1))

    if not args.no_peak:
        r = run_worker(args, sides[0], 'matmul_peak', flops=False)
        results.append(r)
        peak = r.get('peak_flops')
        print(f"matmul peak: {fmt(peak and peak / 1e12, '.1f')} TFLOP/s ({r.get('dtype')} {r.get('n')}^3, "
              f"{r.get('device_name', r.get('device'))})" + (f"  ERROR {r['error']}" if 'error' in r else ''), flush=True)

    for workload in args.workloads:
        if args.schedule == 'paired':
            records = run_paired(args, workload, sides, lambda side: start_served(args, side, workload))
            results.extend(records[s] for s in sides)
            per_side = {s: [records[s]] for s in sides}
        else:
            per_side = run_rounds(args, workload, sides, results)
        summary[workload] = {s: summarize(per_side[s]) for s in sides}
        if len(sides) == 2:
            speedups = block_speedups(*(per_side[s][-1] for s in sides))
            summary[workload]['block_speedups'] = speedups or None
        save()
    report(args, summary, results, peak, sides)
    save()


if __name__ == '__main__':
    main()

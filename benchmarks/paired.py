"""The paired schedule of `run.py`: both sides' workers stay up and their calls alternate in blocks.

Why: the shared 2-core machines change speed by up to 4x within minutes (other tenants: steal
time, caches, memory bandwidth), and in the round schedule one side's subprocess can run in a
fast minute and the other's in a slow one. Here each side's worker is started once (its
warm-up and compilation are not timed, and the two never compile at the same time), then for
`--blocks` blocks the sides take turns, the first side flipping each block: one side makes
`--rewarm` untimed calls (its caches were just filled by the other process) and `--repeats`
timed ones, then the other side does the same. Only one process computes at a time; the other
waits on its stdin. Each block gives one speedup from the two sides' medians in it, measured
seconds apart; `run.py` prints the median of those next to the ratio of the overall medians.

The worker's side of this is `worker.py --serve` (`serve_workload`).
"""
from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import tempfile
import threading
import time

PREFIX = 'BENCH_'


def worker_environment(pythonpath: str) -> dict:
    """This process's environment with only `pythonpath` on PYTHONPATH: each side must import
    its own `transfusion_pytorch`."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    if pythonpath:
        env['PYTHONPATH'] = pythonpath
    return env


class WorkerFailed(RuntimeError):
    pass


class ServedWorker:
    """One side's `worker.py --serve` process: start it, ask it for timed calls, collect its record."""

    def __init__(self, python: str, pythonpath: str, worker: str, cwd: str, side: str, workload: str,
                 worker_args: list[str]):
        env = worker_environment(pythonpath)
        self.side, self.workload = side, workload
        self.stderr = tempfile.TemporaryFile(mode='w+')
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [python, worker, '--side', side, '--workload', workload, '--serve', *worker_args],
            env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(line.rstrip('\n'))
        self.lines.put(None)   # end of output: the process exited

    def expect(self, tag: str, timeout: float) -> str:
        """The payload of the next `BENCH_<tag>` line; a failed worker's JSON record raises."""
        deadline = time.perf_counter() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                raise WorkerFailed(f'no {PREFIX}{tag} within {timeout:.0f} s') from None
            if line is None:
                raise WorkerFailed(f'worker exited (code {self.proc.wait()}) before {PREFIX}{tag}')
            name, _, payload = line[len(PREFIX):].partition(' ')
            if name == tag:
                return payload
            if name == 'JSON':
                raise WorkerFailed(json.loads(payload).get('error', 'worker stopped early'))

    def send(self, command: str):
        try:
            self.proc.stdin.write(command + '\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise WorkerFailed(f'worker gone: {err}') from err

    def run(self, timed: int, untimed: int, timeout: float) -> list[float]:
        self.send(f'run {timed} {untimed}')
        return json.loads(self.expect('TIMES', timeout))

    def finish(self, timeout: float) -> dict:
        self.send('finish')
        record = json.loads(self.expect('JSON', timeout))
        self.proc.wait(timeout=30)
        return record

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def failed_record(worker: ServedWorker, err: Exception) -> dict:
    """The error record of a worker that failed; the worker is stopped (a timed-out one may still run)."""
    record = dict(side=worker.side, workload=worker.workload, error=f'{type(err).__name__}: {err}'[:1000],
                  stderr_tail=worker.stderr_tail(), wall_s=time.perf_counter() - worker.started)
    worker.stop()
    return record


def run_paired(args, workload: str, sides: list[str], start_worker) -> dict[str, dict]:
    """One workload on the paired schedule; each side's record (or an error record).
    start_worker(side) -> ServedWorker."""
    workers, records = {}, {}
    try:
        for side in sides:               # one at a time: compilation is not timed, but it is CPU-heavy
            try:
                workers[side] = start_worker(side)
            except OSError as err:      # no such interpreter
                records[side] = dict(side=side, workload=workload, error=f'{type(err).__name__}: {err}', stderr_tail='')
                print(f'[{workload} {side}] ERROR {err}', flush=True)
                continue
            try:
                workers[side].expect('READY', args.timeout)
            except WorkerFailed as err:
                records[side] = failed_record(workers.pop(side), err)
                print(f'[{workload} {side}] ERROR {err}\n    ' + records[side]['stderr_tail'][-1500:].replace('\n', '\n    '), flush=True)
        for block in range(args.blocks):
            for side in (sides if block % 2 == 0 else sides[::-1]):
                if side not in workers:
                    continue
                try:
                    times = workers[side].run(args.repeats, args.rewarm, args.timeout)
                except WorkerFailed as err:
                    records[side] = failed_record(workers.pop(side), err)
                    print(f'[{workload} block {block} {side}] ERROR {err}', flush=True)
                    continue
                print(f'[{workload} block {block} {side}] median {statistics.median(times) * 1e3:.1f} ms/call '
                      f'over {len(times)}', flush=True)
        for side, worker in workers.items():
            try:
                records[side] = worker.finish(args.timeout)
                records[side]['wall_s'] = time.perf_counter() - worker.started
            except WorkerFailed as err:
                records[side] = failed_record(worker, err)
                continue
            if 'error' in records[side]:
                records[side]['stderr_tail'] = worker.stderr_tail()
    finally:
        for worker in workers.values():
            if not worker.stderr.closed:
                worker.stop()
    for record in records.values():
        record.update(schedule='paired', round=0, rewarm=args.rewarm)
    return records


def block_speedups(ours: dict | None, peer: dict | None) -> list[float]:
    """Ours over the peer in each block (> 1: ours faster), from the two sides' block medians."""
    if not ours or not peer or 'block_medians' not in ours or 'block_medians' not in peer:
        return []
    rate = lambda record, seconds: record['work_per_step'] / seconds if record['unit'] == 'tok' else 1 / seconds
    return [rate(ours, a) / rate(peer, b) for a, b in zip(ours['block_medians'], peer['block_medians'])]

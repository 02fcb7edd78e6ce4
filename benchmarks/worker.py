"""Benchmark worker: one workload, one side, one process; prints one `BENCH_JSON {...}` line.

    python benchmarks/worker.py --side peer --workload text_train --size cpu --repeats 5

`run.py` starts it under each side's interpreter (both libraries import as
`transfusion_pytorch`) and reads the JSON. The workloads and per-side settings: `workloads.py`.

Timing: `warmup` untimed calls (compilation, autotuning, the peer's strategy router), then
`repeats` calls, each bracketed by device synchronisation; the worker reports every time.
With `--serve` it stays up after the warm-up and makes timed calls when `run.py` asks
(`serve_workload`), so that both sides' calls can alternate in blocks of a few.
Peak memory: CUDA `max_memory_allocated` over the timed calls (weights + optimizer state +
activations), and `max_memory_reserved`, which holds CUDA-graph pools; CPU: growth of the
resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs where allowed) over
the resident size before the first call.
FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward + backward of a one-sample
batch of the same per-sample structure (FLOPs per token do not depend on batch size), with
`torch.compile` forced eager. It counts matmul-like ops; attention counts as dense
(masked-out blocks are not subtracted) on both sides, SDPA's CPU kernel included (`flop_counter`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from workloads import (NFE_MODULE_ATTR, OURS_FALLBACK_KWARGS, PEER_FALLBACK_KWARGS, SIZES, WORKLOADS,
                       Task, build_model, deep_merge, force_eager, matmul_peak, sync)


def proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False



def cpu_name() -> str:
    """The CPU's model name and whether it has AMX: bf16 figures differ by an order of magnitude
    between CPUs with and without it, and the shared machines here are of both kinds."""
    try:
        info = Path('/proc/cpuinfo').read_text()
    except OSError:
        return 'cpu'
    model = next((line.split(':', 1)[1].strip() for line in info.splitlines() if line.startswith('model name')), 'cpu')
    return f"{model}, {'with' if 'amx_bf16' in info else 'without'} AMX"


def flop_counter():
    """FlopCounterMode that also counts SDPA's CPU kernel and MKL's packed-weight product (ours
    samples with it on CPU). torch's table leaves both out (it counts 0 for them); here SDPA gets
    the dense formula torch uses for the CUDA kernels, the packed product that of its matmul."""
    from torch.utils import flop_counter
    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def packed_linear(x_shape, packed_shape, weight_shape, *args, out_shape=None, **kwargs):
        rows = 1
        for size in x_shape[:-1]:
            rows *= size
        return 2 * rows * weight_shape[0] * weight_shape[1]

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    if hasattr(getattr(torch.ops, 'mkl', None), '_mkl_linear'):
        mapping[torch.ops.mkl._mkl_linear] = packed_linear
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)


def count_nfe_and_flops(model, task: Task, side: str) -> tuple[int | None, float | None]:
    """Network evaluations in one call of `task.step` (a forward pre-hook on the network) and
    the FLOPs that call does (FlopCounterMode; compiled code forced eager, no CUDA graphs)."""
    net = model
    for name in NFE_MODULE_ATTR[side].split('.'):
        net = getattr(net, name, None)
    calls = []
    handle = net.register_forward_pre_hook(lambda *_: calls.append(1)) if net is not None else None
    try:
        try:
            counter = flop_counter()
            with force_eager(), counter:
                task.count_step()
            flops = counter.get_total_flops()
        except Exception:   # e.g. the peer's eager flex attention under a dispatch mode: NFE only
            calls.clear()
            with force_eager():
                task.count_step()
            flops = None
    finally:
        if handle is not None:
            handle.remove()
    return (len(calls) if net is not None else None), flops


def count_flops_per_token(task: Task) -> float | None:
    counter = flop_counter()
    with force_eager(), counter:
        task.flop_step()
    return counter.get_total_flops() / task.flop_tokens



def build_task(side: str, name: str, cfg: dict, device: torch.device, extra_kwargs: dict | None,
               result: dict):
    """The model and task after their first (warm-up) call. If that call fails and the side has
    a fallback for this device, the model is rebuilt with it and `result['fallback']` says why."""
    model, info = build_model(side, cfg, device, extra_kwargs, workload = name)
    task = WORKLOADS[name](model, cfg)
    fallback = (PEER_FALLBACK_KWARGS if side == 'peer' else OURS_FALLBACK_KWARGS)[device.type]
    try:
        task.step()
    except Exception as err:
        if fallback is None:
            raise
        result['fallback'] = dict(reason=f'{type(err).__name__}: {err}'[:500], kwargs=fallback)
        del model, task
        model, info = build_model(side, cfg, device, deep_merge(extra_kwargs or {}, fallback), workload = name)
        task = WORKLOADS[name](model, cfg)
        task.step()
    result.update(info, model_config=dict(transformer=cfg['transformer'], dim_latent=cfg['dim_latent']))
    result.update(unit=task.unit, work_per_step=task.work, workload_config=task.info)
    return model, task


def time_task(task: Task, device: torch.device, repeats: int, result: dict):
    """`repeats` synchronised calls into `result['times_s']`, and the memory they peaked at;
    returns the last call's output."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_rss_peak()
    rss_before = proc_status_kib('VmRSS')

    result['times_s'], out = timed_calls(task, device, repeats)
    record_memory(result, device, rss_reset, rss_before)
    return out


def timed_calls(task: Task, device: torch.device, count: int) -> tuple[list[float], object]:
    """`count` calls of `task.step`, each bracketed by device synchronisation: their seconds,
    and the last call's output."""
    times, out = [], None
    for _ in range(count):
        sync(device)
        t0 = time.perf_counter()
        out = task.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def record_memory(result: dict, device: torch.device, rss_reset: bool, rss_before: int | None):
    """The peak memory since the CUDA statistics or the RSS high-water mark were reset."""
    if device.type == 'cuda':
        # reserved as well: a CUDA graph's pool is reserved once, and its replays allocate nothing
        result.update(peak_mem_mib=torch.cuda.max_memory_allocated() / 2 ** 20, mem_kind='cuda max allocated',
                      peak_reserved_mib=torch.cuda.max_memory_reserved() / 2 ** 20)
    elif rss_before is not None:
        result.update(peak_mem_mib=(proc_status_kib('VmHWM') - rss_before) / 1024,
                      mem_kind='cpu RSS high-water growth' + ('' if rss_reset else ' (HWM not reset)'))


def prepare_workload(side: str, name: str, size: str, warmup: int | None, extra_kwargs: dict | None,
                     cpu_bf16: bool = False) -> tuple:
    """The result record so far and, but for 'matmul_peak' (measured here, model and task None),
    the model, task, device and size config after the warm-up calls."""
    device = torch.device('cuda' if size == 'gpu' else 'cpu')
    cfg = dict(SIZES[size], side=side, cpu_bf16=cpu_bf16)
    warmup = max(1, cfg['warmup'][name] if warmup is None else warmup)  # the first call is a warm-up
    result = dict(side=side, workload=name, size=size, device=str(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), warmup=warmup,
                  precision='bf16 autocast' if device.type == 'cuda' or cpu_bf16 else 'fp32')
    result['device_name'] = torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()
    if name == 'matmul_peak':
        return result, None, None, device, cfg

    model, task = build_task(side, name, cfg, device, extra_kwargs, result)
    for _ in range(warmup - 1):
        task.step()
    sync(device)
    return result, model, task, device, cfg


def finish_workload(result: dict, model, task: Task, cfg: dict, out, flops: bool):
    """The output shape, and the NFE and FLOPs counted after the timed calls."""
    name, side = result['workload'], result['side']
    if torch.is_tensor(out):
        result['output_shape'] = list(out.shape)
    if name == 'gen_modality':   # FLOP/tok here: forward FLOPs of one whole call per latent token
        result['nfe'], counted = count_nfe_and_flops(model, task, side)
        result['flops_per_token'] = counted / cfg['modality_len'] if counted is not None else None
    if flops and task.flop_step is not None:
        try:
            result['flops_per_token'] = count_flops_per_token(task)
        except Exception as err:  # a FLOP-count failure must not lose the timing
            result['flops_error'] = f'{type(err).__name__}: {err}'[:500]


def run_workload(side: str, name: str, size: str, repeats: int, warmup: int | None,
                 extra_kwargs: dict | None, flops: bool, cpu_bf16: bool = False) -> dict:
    result, model, task, device, cfg = prepare_workload(side, name, size, warmup, extra_kwargs, cpu_bf16)
    result['repeats'] = repeats
    if name == 'matmul_peak':
        result.update(matmul_peak(device, result['warmup'], repeats, cpu_bf16))
        return result
    out = time_task(task, device, repeats, result)
    finish_workload(result, model, task, cfg, out, flops)
    return result


def serve_workload(side: str, name: str, size: str, warmup: int | None, extra_kwargs: dict | None,
                   flops: bool, cpu_bf16: bool = False) -> dict:
    """Paired schedule (`run.py --schedule paired`): after the warm-up, print `BENCH_READY` and
    obey stdin, one command a line: `run K W` makes W untimed calls (caches warmed again after the
    other side's process ran), then K timed ones, and prints `BENCH_TIMES [seconds, ...]`;
    `finish` (or end of input) returns the record, with every timed call in `times_s` and each
    block's median in `block_medians`. Memory is measured over all timed calls together."""
    if name == 'matmul_peak':
        raise ValueError('matmul_peak is measured by run_workload, not served')
    result, model, task, device, cfg = prepare_workload(side, name, size, warmup, extra_kwargs, cpu_bf16)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    rss_reset, rss_before = reset_rss_peak(), proc_status_kib('VmRSS')
    print('BENCH_READY', flush=True)
    times, block_medians, out = [], [], None
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == 'finish':
            break
        timed, untimed = int(command[1]), int(command[2])
        for _ in range(untimed):
            task.step()
        block, out = timed_calls(task, device, timed)
        times += block
        block_medians.append(statistics.median(block))
        print('BENCH_TIMES ' + json.dumps(block), flush=True)
    result.update(times_s=times, block_medians=block_medians, repeats=len(times))
    record_memory(result, device, rss_reset, rss_before)
    finish_workload(result, model, task, cfg, out, flops)
    return result


def count_only(side: str, name: str, size: str, extra_kwargs: dict | None) -> dict:
    """The FLOPs per token of one workload at `size`, counted on the CPU, untimed. They do not
    depend on the device, and on the CPU both sides attend densely, which FlopCounterMode can
    count, where on a GPU it fails on their flex attention."""
    device = torch.device('cpu')
    cfg = dict(SIZES[size], side=side, cpu_bf16=False)
    model, info = build_model(side, cfg, device, extra_kwargs, workload=name)
    task = WORKLOADS[name](model, cfg)
    result = dict(side=side, workload=name, size=size, device='cpu', flops_only=True, torch=torch.__version__, **info)
    if name == 'gen_modality':
        result['nfe'], flops = count_nfe_and_flops(model, task, side)
        result['flops_per_token'] = flops / cfg['modality_len'] if flops is not None else None
    elif task.flop_step is not None:
        result['flops_per_token'] = count_flops_per_token(task)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--side', choices=('ours', 'peer'), required=True)
    parser.add_argument('--workload', choices=(*WORKLOADS, 'matmul_peak'), required=True)
    parser.add_argument('--size', choices=tuple(SIZES), default='cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=None, help='default: per workload and size')
    parser.add_argument('--kwargs', default='{}', help='JSON merged into the constructor kwargs')
    parser.add_argument('--no-flops', action='store_true')
    parser.add_argument('--cpu-bf16', action='store_true', help='CPU: bf16 autocast (default fp32)')
    parser.add_argument('--flops-only', action='store_true', help='count FLOPs per token on the CPU at --size; no timing')
    parser.add_argument('--serve', action='store_true', help='timed calls on command from stdin (serve_workload)')
    args = parser.parse_args()

    try:
        if args.flops_only:
            result = count_only(args.side, args.workload, args.size, json.loads(args.kwargs))
        elif args.serve:
            result = serve_workload(args.side, args.workload, args.size, args.warmup,
                                    json.loads(args.kwargs), not args.no_flops, args.cpu_bf16)
        else:
            result = run_workload(args.side, args.workload, args.size, args.repeats, args.warmup,
                                  json.loads(args.kwargs), not args.no_flops, args.cpu_bf16)
    except Exception as err:
        import traceback
        traceback.print_exc(file=sys.stderr)
        result = dict(side=args.side, workload=args.workload, size=args.size,
                      error=f'{type(err).__name__}: {err}'[:1000])
    print('BENCH_JSON ' + json.dumps(result), flush=True)


if __name__ == '__main__':
    main()

"""How fast could the CPU modality-generation workload be? Bounds from its matrix products alone.

Records every matrix product (aten mm / addmm / bmm / baddbmm) that one eager call of the
`gen_modality` workload makes with our model (the same shapes, steps and settings as
`worker.py --workload gen_modality`, but with ordinary products where the sampler multiplies
by MKL-packed weights), then:

- replays just those products, in the order recorded, as plain mm / bmm (an addmm's bias is
  left out: compiled CPU code adds it in the next element-wise kernel, see
  `experts.run_linear`), on random tensors of the same shapes and strides (shared between
  calls of the same layout, so the replay reads less memory than the network does), in fp32
  and in bf16 (what autocast would run). Attention, norms, element-wise work and the ODE are
  left out; each product still pays PyTorch's dispatch and an output
  allocation, a few microseconds, so this is the speed of PyTorch's CPU kernels at these
  shapes rather than a strict floor;
- divides the products' FLOPs by the machine's square-matmul rate (fp32 2048^3, measured here):
  the time they would take if they ran at that rate, which small products do not reach;
- times as many products of a tiny shape (64 x 16 @ 16 x 48, next to no arithmetic): the part
  of the replay that is each product's fixed cost (dispatch, and for bf16 oneDNN's per-call
  set-up), not arithmetic.

    python benchmarks/modality_floor.py                      # CPU size; ~20 s
    python benchmarks/modality_floor.py --peer-seconds 0.247 # also: what 5x the peer leaves

Given the peer's time per call, it also prints what 5x the peer leaves for everything else.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/ is not a package)

PRODUCT_OF = {torch.ops.aten.addmm.default: torch.ops.aten.mm.default,
              torch.ops.aten.baddbmm.default: torch.ops.aten.bmm.default}
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, *PRODUCT_OF}


class RecordMatmuls(TorchDispatchMode):
    """Records (product op, [(shape, stride) of its two operands]) of every matrix product
    dispatched while active: strides too, since a weight enters as a transposed view and layout
    changes speed."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args = (), kwargs = None):
        if func in MATMULS:
            product = PRODUCT_OF.get(func, func)
            operands = [a for a in args if torch.is_tensor(a)][-2:]      # addmm / baddbmm: (bias, a, b)
            self.calls.append((product, [(tuple(a.shape), a.stride()) for a in operands]))
        return func(*args, **(kwargs or {}))


def flops(func, inputs) -> int:
    (a, _), (b, _) = inputs
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def replay_seconds(calls, dtype: torch.dtype, repeats: int) -> float:
    # one set of tensors per distinct layout, shared by every call with that layout: the replay
    # then reads less memory than the network (whose layers have their own weights), never more
    shared = {}
    for _, layout in calls:
        for shape, stride in layout:
            if (shape, stride) not in shared:
                shared[shape, stride] = torch.empty_strided(shape, stride, dtype = dtype).normal_()
    inputs = [[shared[shape, stride] for shape, stride in layout] for _, layout in calls]

    def run():
        for (func, _), args in zip(calls, inputs):
            func(*args)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fixed_cost_seconds(count: int, dtype: torch.dtype, repeats: int) -> float:
    """Seconds for `count` products of a tiny shape: what the replay's products cost apart from
    their arithmetic."""
    # the second operand a transposed view, as a linear layer's weight enters
    calls = [(torch.ops.aten.mm.default, [((64, 16), (16, 1)), ((16, 48), (1, 16))])] * count
    return replay_seconds(calls, dtype, repeats)


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n')[0])
    parser.add_argument('--size', choices = tuple(workloads.SIZES), default = 'cpu')
    parser.add_argument('--repeats', type = int, default = 9)
    parser.add_argument('--peer-seconds', type = float, default = None, help = "the peer's median seconds per call")
    args = parser.parse_args()

    cfg = dict(workloads.SIZES[args.size], side = 'ours')
    model, _ = workloads.build_model('ours', cfg, torch.device('cpu'))
    task = workloads.gen_modality(model, cfg)
    recorder = RecordMatmuls()
    from transfusion_pytorch import packed_linear
    packed_linear.ENABLED = False     # record the block products as ordinary products, not MKL-packed ones
    with workloads.force_eager(), recorder:
        task.count_step()
    total = sum(flops(func, layout) for func, layout in recorder.calls)
    print(f'{len(recorder.calls)} matrix products per call, {total / 1e9:.2f} GFLOP '
          f'({cfg["modality_len"]} latent tokens, threads {torch.get_num_threads()})')
    peak = workloads.matmul_peak(torch.device('cpu'), warmup = 2, repeats = 20)['peak_flops']
    timings = [(f'{dtype} products replayed', replay_seconds(recorder.calls, dtype, args.repeats))
               for dtype in (torch.float32, torch.bfloat16)]
    timings.append((f'fp32 at the 2048^3 rate ({peak / 1e9:.0f} GFLOP/s)', total / peak))
    for label, seconds in timings:
        line = f'{label:42s} {seconds * 1e3:6.1f} ms per call, {total / seconds / 1e9:4.0f} GFLOP/s'
        if args.peer_seconds:
            allowed = args.peer_seconds / 5
            line += f'; 5x the peer ({allowed * 1e3:.1f} ms) leaves {(allowed - seconds) * 1e3:.1f} ms for the rest'
        print(line, flush = True)
    for dtype in (torch.float32, torch.bfloat16):
        seconds = fixed_cost_seconds(len(recorder.calls), dtype, args.repeats)
        print(f'{str(dtype) + " fixed cost (tiny shape)":42s} {seconds * 1e3:6.1f} ms per call', flush = True)


if __name__ == '__main__':
    main()

"""Where the time goes on a GPU, for a lent machine (a diagnostic, not the benchmark):

1. modality generation (256 latent tokens, 15 midpoint steps = 30 evaluations) with each
   evaluation replayed from a CUDA graph, eagerly, and replayed from a CUDA graph of the compiled
   blocks (decoding.COMPILED_STEP_DEVICES with 'cuda': fewer, fused kernels per evaluation): time,
   and the largest difference of each graphed output from the eager one for the same seed;
2. one mixed training step with compiled blocks: median time, the host's time to issue it,
   device time (sum of the kernels the profiler saw), the host syncs it makes (CUDA sync debug
   mode), the top host and device ops;
3. the same step launched with less host work, since the H100 profile showed a host-bound step
   (48 ms a step, 35.9 ms of kernels): the blocks' kernels replayed as CUDA graphs
   (compile_options {'triton.cudagraphs': True}), and launched from a C++ wrapper
   (compile_options {'cpp_wrapper': True});
4. the same step with the feed-forward computed padded to width 2736
   (transformer.ff_pad_multiple = 16), and last the whole stack as one region in CUDA graphs
   (compile_stack, whose compile took 44 s on an H100);
5. before those, the bare feed-forward matmuls of the benchmark shape at width 2730
   (int(1024 * 4 * 2 / 3), not a multiple of 8: the H100 profile showed sm80 cutlass kernels
   for them) against 2736, with and without bias.
Each variant of the step is tried on its own: one that fails prints its error and the rest go on.
(compile_stack was measured here once: 49.8 ms against 48.0 ms per block on an H100, after a
44 s compile; `mixed_step(compile_blocks = True, compile_stack = True)` repeats it.)

    python benchmarks/gpu_profile.py            # about 2-4 minutes, most of it compilation
    python benchmarks/gpu_profile.py --sections profile variants \
        --profile '{"compile_stack": true}' --variants '{"ff_pad_multiple": 16}'   # a part of it
"""
import argparse
import json
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from transfusion_pytorch import Transfusion, decoding

SHAPE = dict(num_text_tokens = 256, dim_latent = 64, modality_default_shape = (256,))
TRANSFORMER = dict(dim = 1024, depth = 12, heads = 16, dim_head = 64)


def mixed_batch(device):
    g = torch.Generator().manual_seed(1)
    sample = lambda: [torch.randint(0, 256, (128,), generator = g), torch.randn(256, 64, generator = g),
                      torch.randint(0, 256, (128,), generator = g), torch.randn(256, 64, generator = g),
                      torch.randint(0, 256, (64,), generator = g)]
    return [[x.to(device) for x in sample()] for _ in range(8)]


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def host_time(fn, repeats):
    """Median seconds the host takes to issue fn from an idle GPU, not waiting for it at the end:
    close to the step's wall time, the step is host-bound (the GPU waits for launches)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def modality_generation():
    """Eager blocks with and without CUDA graphs, then compiled blocks inside the graphs."""
    model = Transfusion(**SHAPE, transformer = dict(TRANSFORMER, compile_blocks = True)).cuda().eval()
    outputs = {}
    for name, graphs, compiled in (('graphed', True, False), ('eager', False, False), ('graphed, compiled blocks', True, True)):
        decoding.COMPILED_STEP_DEVICES = {'cpu', 'cuda'} if compiled else {'cpu'}
        run = lambda: model.generate_modality_only(1, 0, (256,), modality_steps = 15, seed = 0, cuda_graphs = graphs)
        try:
            with torch.autocast('cuda', dtype = torch.bfloat16):
                start = time.perf_counter()
                outputs[name] = run()
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                print(f'modality generation, {name}: first call {first:.2f} s, then {timed(run, 5):.4f} s '
                      f'(256 tokens, 30 evaluations)', flush = True)
        except Exception as error:  # the variant must not cost the rest of the profile
            print(f'modality generation, {name}: failed: {type(error).__name__}: {str(error)[:300]}', flush = True)
    decoding.COMPILED_STEP_DEVICES = {'cpu'}
    for name in ('graphed', 'graphed, compiled blocks'):
        if name in outputs and 'eager' in outputs:
            difference = (outputs[name].float() - outputs['eager'].float()).abs().max().item()
            print(f'modality generation: max |{name} - eager| = {difference:.3g}', flush = True)


def mixed_step(**transformer_options):
    model = Transfusion(**SHAPE, transformer = dict(TRANSFORMER, **transformer_options)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = True)
    batch = mixed_batch('cuda')

    def step():
        with torch.autocast('cuda', dtype = torch.bfloat16):
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    tokens = sum(x.shape[0] for sample in batch for x in sample)
    median = timed(step, 7)
    print(f'mixed step {transformer_options}: warm-up (compile) {time.perf_counter() - start:.1f} s, '
          f'median {median * 1e3:.1f} ms = {tokens / median / 1e3:.1f}k tokens/s; '
          f'host {host_time(step, 7) * 1e3:.1f} ms to issue it', flush = True)
    return step


def profile_step(step):
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        step()
        torch.cuda.set_sync_debug_mode('default')
    syncs = [str(w.message).splitlines()[0] for w in caught if 'called a synchronizing' in str(w.message)]
    print(f'host syncs in one step: {len(syncs)} {syncs[:3]}', flush = True)
    with profile(activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    print(f'device time in one profiled step: {device_ms:.1f} ms (kernels, summed)', flush = True)
    print(averages.table(sort_by = 'self_cuda_time_total', row_limit = 12, max_name_column_width = 60), flush = True)
    print(averages.table(sort_by = 'self_cpu_time_total', row_limit = 25, max_name_column_width = 60), flush = True)


def feed_forward_alignment(tokens: int = 6784, dim: int = 1024):
    for hidden in (2730, 2736):
        for bias in (True, False):
            x = torch.randn(tokens, dim, device = 'cuda', dtype = torch.bfloat16)
            w_in = torch.randn(2 * hidden, dim, device = 'cuda', dtype = torch.bfloat16)
            w_out = torch.randn(dim, hidden, device = 'cuda', dtype = torch.bfloat16)
            b_in = torch.randn(2 * hidden, device = 'cuda', dtype = torch.bfloat16) if bias else None
            b_out = torch.randn(dim, device = 'cuda', dtype = torch.bfloat16) if bias else None
            h = torch.randn(tokens, hidden, device = 'cuda', dtype = torch.bfloat16)
            run = lambda: (torch.nn.functional.linear(x, w_in, b_in), torch.nn.functional.linear(h, w_out, b_out))
            run()
            seconds = timed(lambda: [run() for _ in range(10)], 5) / 10
            flops = 2 * tokens * dim * 3 * hidden
            print(f'feed-forward matmuls, hidden {hidden}, bias {bias}: {seconds * 1e3:.3f} ms, '
                  f'{flops / seconds / 1e12:.0f} TFLOP/s', flush = True)


DEFAULT_VARIANTS = [dict(compile_options = {'triton.cudagraphs': True}), dict(compile_options = {'cpp_wrapper': True}),
                    dict(ff_pad_multiple = 16), dict(compile_stack = True, compile_options = {'triton.cudagraphs': True})]


def parse_args():
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('--sections', nargs = '+', default = ['ff', 'modality', 'profile', 'variants'],
                        choices = ['ff', 'modality', 'profile', 'variants'])
    parser.add_argument('--profile', type = json.loads, default = {},
                        help = 'transformer options (JSON) of the step that is profiled, beside compile_blocks')
    parser.add_argument('--variants', type = json.loads, nargs = '+', default = DEFAULT_VARIANTS,
                        help = 'transformer options (JSON) of each step variant timed, beside compile_blocks')
    return parser.parse_args()


if __name__ == '__main__':
    args = parse_args()
    torch.manual_seed(0)
    if 'ff' in args.sections:
        feed_forward_alignment()
    if 'modality' in args.sections:
        modality_generation()
    if 'profile' in args.sections:
        profile_step(mixed_step(compile_blocks = True, **args.profile))
    for options in args.variants if 'variants' in args.sections else []:
        try:
            mixed_step(compile_blocks = True, **options)
        except Exception as error:  # one variant failing must not cost the others their device time
            print(f'mixed step {options}: failed: {type(error).__name__}: {str(error)[:300]}', flush = True)

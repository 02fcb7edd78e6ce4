"""Where the time goes on a GPU: a profiled mixed training step (eager blocks, so no compile
wait) and modality generation with compiled blocks. Prints the top CUDA kernels and the
step/generation times; a short diagnostic for a lent GPU machine, not a benchmark.

    python benchmarks/gpu_profile.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from transfusion_pytorch import Transfusion

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


def profile_mixed_step():
    model = Transfusion(**SHAPE, transformer = TRANSFORMER).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = True)
    batch = mixed_batch('cuda')

    def step():
        with torch.autocast('cuda', dtype = torch.bfloat16):
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)

    for _ in range(3):
        step()
    print(f'mixed step, eager blocks: {timed(step, 5) * 1e3:.1f} ms', flush = True)
    with profile(activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by = 'cuda_time_total', row_limit = 18, max_name_column_width = 60), flush = True)
    print(prof.key_averages().table(sort_by = 'cpu_time_total', row_limit = 12, max_name_column_width = 60), flush = True)


def time_modality_generation():
    for compile_blocks in (False, True):
        model = Transfusion(**SHAPE, transformer = dict(TRANSFORMER, compile_blocks = compile_blocks)).cuda().eval()
        run = lambda: model.generate_modality_only(1, 0, (256,), modality_steps = 15)
        with torch.autocast('cuda', dtype = torch.bfloat16):
            start = time.perf_counter()
            run()
            print(f'modality generation, compile_blocks={compile_blocks}: first call {time.perf_counter() - start:.1f} s', flush = True)
            run()
            print(f'modality generation, compile_blocks={compile_blocks}: {timed(run, 5):.3f} s (256 tokens, 30 NFE)', flush = True)


if __name__ == '__main__':
    torch.manual_seed(0)
    time_modality_generation()
    profile_mixed_step()

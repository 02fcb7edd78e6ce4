"""torchrun worker for tests/test_distributed.py: the same model and per-rank batches under
DistributedDataParallel and FSDP2, on CPU processes over gloo.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py WORKDIR

Reads WORKDIR/inputs.pt, written by the test: {'config': TransfusionConfig dict, 'state': the
initial state dict, 'cases': {case: [(batch, times, noise) for each rank]}}. For every wrapping
and case it runs two forward/backward passes (DDP reports a parameter that got no gradient only
when the next iteration starts) and rank 0 writes the gradients of the second pass, gathered
to full tensors, to WORKDIR/grads.pt as {'wrapping/case': {parameter name: gradient}}.
"""
from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from transfusion_pytorch import Transfusion, TransfusionConfig

WRAPPINGS = ('ddp', 'fsdp_blocks', 'fsdp_model')

# Block returns its attention values (a view) for value residual learning; nothing modifies
# them in place, which is what this FSDP2 warning is about
warnings.filterwarnings('ignore', message = r'FSDP2-wrapped module .* returned a view tensor')


def wrap(model: Transfusion, wrapping: str, mesh) -> torch.nn.Module:
    """Plain DDP (no find_unused_parameters), or FSDP2 per block and then the whole model (the
    usual recipe), or FSDP2 on the whole model only. fully_shard shards the module in place."""
    if wrapping == 'ddp':
        return DistributedDataParallel(model)
    if wrapping == 'fsdp_blocks':
        for block in model.transformer.blocks:
            fully_shard(block, mesh = mesh)
    fully_shard(model, mesh = mesh)
    return model


def gradients(wrapping: str, config: TransfusionConfig, state: dict, rank_input, mesh) -> dict:
    """Full gradients after the second of two identical training passes (every rank calls this:
    gathering FSDP2 shards is collective)."""
    model = Transfusion.from_config(config)
    model.load_state_dict(state)
    wrapped = wrap(model, wrapping, mesh)
    batch, times, noise = rank_input
    for _ in range(2):
        wrapped.zero_grad(set_to_none = True)
        wrapped(batch, times = times, noise = noise).backward()
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return grads


def main(workdir: Path) -> None:
    dist.init_process_group('gloo', timeout = timedelta(seconds = 60))
    rank = dist.get_rank()
    inputs = torch.load(workdir / 'inputs.pt', weights_only = True)
    mesh = init_device_mesh('cpu', (dist.get_world_size(),))
    results = {}
    for name, model in inputs['models'].items():
        config = TransfusionConfig.from_dict(model['config'])
        for case, per_rank in inputs['cases'].items():
            for wrapping in WRAPPINGS:
                results[f'{name}/{wrapping}/{case}'] = gradients(wrapping, config, model['state'], per_rank[rank], mesh)
    if rank == 0:
        torch.save(results, workdir / 'grads.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(Path(sys.argv[1]))

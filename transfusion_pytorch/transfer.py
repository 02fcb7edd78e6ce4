"""Moving small tensors between host and GPU without stalling the GPU.

A blocking copy from pageable host memory to the GPU synchronises the stream, and reading a
device value back (`.item()`) waits for everything queued before it. Either in a training step
lets the GPU run dry while the host waits; the H100 profile (benchmarks/results/h100_profile.log)
counted two such syncs per mixed training step. Off CUDA these are plain copies.
"""
from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A copy of a tensor (usually on the host) on `device`; from the host to a GPU through
    pinned memory and a non-blocking copy."""
    if device.type != 'cuda' or tensor.device.type != 'cpu':
        return tensor.to(device, copy = True)
    return tensor.pin_memory().to(device, non_blocking = True)


def cat_on_device(tensors: list[Tensor], device: torch.device) -> Tensor:
    """torch.cat of tensors on `device`, host tensors joined on the host first and moved in one
    transfer (not one per item)."""
    if all(t.device == device for t in tensors):
        return torch.cat(tensors)
    host = [t for t in tensors if t.device.type == 'cpu']
    if len(host) == len(tensors):
        return host_to_device(torch.cat(host), device)
    return torch.cat([host_to_device(t, device) if t.device.type == 'cpu' else t.to(device) for t in tensors])


class EarlyFlag:
    """A bool tensor read back to the host as soon as it is computed: `value()` then waits for
    that point of the stream only, not for the work queued after it (the forward)."""

    def __init__(self, flag: Tensor):
        self.ready = None
        if flag.device.type == 'cuda':
            with torch.cuda.device(flag.device):   # the event must follow the flag's stream
                flag = flag.to('cpu', non_blocking = True)   # into pinned memory, queued right here
                self.ready = torch.cuda.Event()
                self.ready.record()
        self.flag = flag

    def value(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()
        return bool(self.flag.item())

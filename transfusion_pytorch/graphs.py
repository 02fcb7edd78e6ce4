"""Replaying a fixed-shape function as one CUDA graph.

An ODE evaluation during sampling runs the whole transformer on a few hundred tokens: on a GPU
its arithmetic takes far less time than launching its few hundred kernels one by one. Between
the evaluations of one instance nothing changes but the values of x and t, so the evaluation is
captured once as a CUDA graph and replayed: one launch per evaluation.

A captured function must only read its inputs through the tensors it is called with and must
not synchronise with the host; tensors it closes over (weights, the KV cache, masks built
beforehand) are read at their addresses at replay time, so they must stay alive and in place.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor


class GraphedFunction:
    """fn(*inputs) -> Tensor, replayed from a CUDA graph after its first call.

    The first call runs fn eagerly on a side stream (CUDA graphs need one warm-up run there),
    returns that result, and captures the graph; later calls copy their inputs into the
    graph's static input buffers and replay. A call whose inputs differ in shape or dtype from
    the captured ones runs eagerly (copying them into the buffers would broadcast or cast them
    silently). Off CUDA, or with enabled=False, fn runs eagerly every time. If capture fails (fn
    synchronises, or an op cannot be captured) it warns once and runs eagerly from then on.
    """

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True):
        self.fn = fn
        self.enabled = enabled
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[Tensor] = []
        self.static_output: Tensor | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not self.enabled or not inputs[0].is_cuda:
            return self.fn(*inputs)
        with torch.cuda.device(inputs[0].device):   # capture and replay on the inputs' GPU, not the current one
            if self.graph is None:
                return self._warm_up_and_capture(inputs)
            if any(value.shape != static.shape or value.dtype != static.dtype for static, value in zip(self.static_inputs, inputs)):
                return self.fn(*inputs)
            for static, value in zip(self.static_inputs, inputs):
                static.copy_(value)
            self.graph.replay()
            return self.static_output.clone()   # the buffer is overwritten by the next replay

    def _warm_up_and_capture(self, inputs: tuple[Tensor, ...]) -> Tensor:
        self.static_inputs = [value.clone() for value in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_output = self.fn(*self.static_inputs)
        except Exception as error:  # an op that cannot be captured: stay correct, run eagerly
            warnings.warn(f'CUDA graph capture failed, running eagerly instead: {error}')
            self.enabled, self.static_inputs, self.static_output = False, [], None
            return result
        self.graph = graph
        return result

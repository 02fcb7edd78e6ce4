"""Calling a compiled region's graph again directly, past torch.compile's checks: the ODE
evaluations and the text decoding steps on CPU.

Between the evaluations of one modality instance nothing changes but the values of x and t (on a
GPU, graphs.py replays them as one CUDA graph). On CPU each evaluation is one compiled region
(decoding.compiled_evaluation), and every call through torch.compile pays, before its graph runs,
for Dynamo's guard checks and for gathering the region's arguments (weights, cache views, the
step context) in Python: 160-185 us of a 1.8 ms (bf16) or 2.3 ms (fp32) evaluation of 64 latent
tokens at dim 256, depth 4, on 2 CPU cores. Replayed, about 55 us remain, and the whole 30-evaluation
call took 63.4 -> 59.1 ms in bf16 and 80.5 -> 76.1 ms in fp32 (medians of 40 calls each, the two
ways interleaved in one process). A text decoding step (text_generation.TextDecoder) has no
changing inputs at all: it reads and updates its own buffers.

`recorded_region` compiles a function with Inductor through a backend that notes the graph,
arguments and outputs of its latest call. `Replayed` calls the region through torch.compile
twice; if each call ran exactly one graph, with the same arguments but for the changing inputs,
and returned one of that graph's outputs, later calls hand the graph those arguments with the new
inputs in place, directly.

Why that is safe here, and only where the caller can promise it: the guards skipped check the
Python values and tensors the region reads, and the caller keeps those as they are between the
calls of one `Replayed` (decoding builds one per ODE solve: the same model, weights, cache and
context). Each call still checks what can change: the shape, stride, dtype and device of the
changing inputs (not views, which may alias) and the grad and autocast modes; a mismatch goes
through torch.compile. Eager work in the region (a graph break) shows as a second graph call, or
as a result that is not an output of the graph, and keeps every call going through torch.compile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .compiling import compile_region, with_own_code
from .packed_linear import calls_packed_products


class RecordingInductor:
    """A Dynamo backend: Inductor with `options`; `latest` is the (graph, arguments, outputs)
    of its latest graph call and `calls` counts graph calls (both reset by the caller)."""

    def __init__(self, options: dict | None):
        # torch.compile accepts 'a-b' for the Inductor option 'a_b'; compile_fx takes only the latter
        self.options = {name.replace('-', '_'): value for name, value in (options or {}).items()}
        self.latest: tuple[Callable, tuple, Any] | None = None
        self.calls = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx
        with calls_packed_products():
            graph = compile_fx(graph_module, example_inputs, config_patches = self.options)

        def run(*arguments):
            outputs = graph(*arguments)
            self.calls += 1
            self.latest = (graph, arguments, outputs)
            return outputs
        return run


@dataclass
class RecordedRegion:
    fn: Callable                 # fn compiled by torch.compile with `recorder` as its backend
    recorder: RecordingInductor


def recorded_region(fn: Callable, options: dict | None, **settings) -> RecordedRegion:
    """fn compiled with Inductor (options as torch.compile's), recording its graph calls.
    settings: more torch.compile arguments (fullgraph, dynamic)."""
    recorder = RecordingInductor(options)
    return RecordedRegion(compile_region(with_own_code(fn), None, backend = recorder, **settings), recorder)


def _modes(device: torch.device) -> tuple:
    """The global state a compiled graph was specialised for, as far as a replay can change it."""
    autocast = torch.is_autocast_enabled(device.type)
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
            torch.get_autocast_dtype(device.type) if autocast else None)


def _signature(inputs: tuple[Tensor, ...], device: torch.device) -> tuple:
    """What a replay checks of the changing inputs: their layout, and that they are not views
    (which could alias the region's other tensors; torch.compile guards views apart); and the
    modes on the region's device."""
    layouts = tuple((value.shape, value.stride(), value.dtype, value.device, value._base is None) for value in inputs)
    return layouts, _modes(device)


def _same(a, b) -> bool:
    """The same argument in two calls: the same tensor, or an equal number (a size Dynamo
    passes as a value)."""
    return a is b or (not isinstance(a, Tensor) and type(a) is type(b) and a == b)


@dataclass
class _Plan:
    graph: Callable
    arguments: list              # the graph's arguments, None at the changing inputs' positions
    positions: list[int]         # where each changing input goes
    output: int                  # which graph output the region returns
    signature: tuple             # what the changing inputs and the modes must match

    def matches(self, other: _Plan) -> bool:
        return (self.graph is other.graph and self.positions == other.positions and self.output == other.output
                and self.signature == other.signature and len(self.arguments) == len(other.arguments)
                and all(_same(a, b) for a, b in zip(self.arguments, other.arguments)))


class Replayed:
    """fn(*inputs) -> Tensor for `inputs` (tensors, possibly none) that change between calls,
    everything else fn reads staying as it is (see the module docstring); after two calls through
    torch.compile that agree, later calls call the recorded graph directly. device: the region's."""

    def __init__(self, fn: Callable[..., Tensor], region: RecordedRegion, device: torch.device):
        self.fn = fn
        self.device = torch.device(device)
        self.recorder = region.recorder
        self.candidate: _Plan | None = None
        self.plan: _Plan | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        plan = self.plan
        if plan is not None and _signature(inputs, self.device) == plan.signature:
            arguments = list(plan.arguments)
            for position, value in zip(plan.positions, inputs):
                arguments[position] = value
            return plan.graph(*arguments)[plan.output]
        return self._through_torch_compile(inputs)

    def _through_torch_compile(self, inputs: tuple[Tensor, ...]) -> Tensor:
        recorder = self.recorder
        recorder.latest, recorder.calls = None, 0
        try:
            result = self.fn(*inputs)
            latest = recorder.latest if recorder.calls == 1 else None
        finally:
            recorder.latest = None   # it holds the call's tensors
        plan = _plan(latest, inputs, result, self.device) if self.plan is None else None
        if plan is not None and self.candidate is not None and plan.matches(self.candidate):
            self.plan, self.candidate = plan, None
        else:
            self.candidate = plan
        return result


def _plan(latest: tuple | None, inputs: tuple[Tensor, ...], result: Tensor, device: torch.device) -> _Plan | None:
    """How to replay the recorded graph call `latest` with new inputs, or None where it cannot
    stand for the whole call: each input passed once, the result one of its outputs."""
    if latest is None:
        return None
    graph, arguments, outputs = latest
    positions = [[i for i, argument in enumerate(arguments) if argument is value] for value in inputs]
    output = [i for i, value in enumerate(outputs) if value is result] if isinstance(outputs, (tuple, list)) else []
    if any(len(found) != 1 for found in positions) or len(output) != 1:
        return None
    positions = [found[0] for found in positions]
    arguments = [None if i in positions else argument for i, argument in enumerate(arguments)]
    return _Plan(graph, arguments, positions, output[0], _signature(inputs, device))

"""Constant fp32 tables (rotary and time-embedding frequencies, ALiBi slopes) that survive `model.to(dtype)`,
and the fp32 floor (`at_least_fp32`) of the computations that must not round in bf16.

Such a table is a non-persistent buffer, so it follows the model to its device; but
`model.to(torch.bfloat16)` would also round it, and a checkpoint reloaded in fp32
(`from_pretrained(..., dtype = torch.float32)`) rebuilds it unrounded. Measured on a
bf16-cast model: rotary cosines off by up to 0.15 at position 1000 and the time embedding off
by 14% against its fp32 reload. A `ConstantTables` module rebuilds its tables in fp32 from
their definition whenever the module is moved or cast, on the tables' new device (also after
`to_empty`, whose buffers would otherwise hold uninitialised memory).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32 if its dtype is narrower (bf16, fp16); an fp64 model's rotary and losses stay fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ConstantTables(nn.Module):
    """A module whose `tables()` (name -> fp32 Float tensor on a given device) are registered as
    non-persistent buffers at construction and rebuilt, not cast, by every `_apply` (`to`,
    `cuda`, `half`, `to_empty`, ...)."""

    def tables(self, device) -> dict[str, Tensor]:
        raise NotImplementedError

    def register_tables(self) -> None:
        for name, value in self.tables(None).items():
            self.register_buffer(name, value, persistent = False)

    def _apply(self, fn, recurse = True):
        super()._apply(fn, recurse)
        for name, value in self.tables(next(self.buffers(recurse = False)).device).items():
            setattr(self, name, value)
        return self

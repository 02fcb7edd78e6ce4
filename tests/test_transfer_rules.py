"""Rules of host-device transfers that a mutation review found no test holding: a copy on the same device, order across devices."""
from __future__ import annotations

import pytest
import torch

from transfusion_pytorch.transfer import cat_on_device, host_to_device


def test_host_to_device_returns_a_copy_also_on_the_same_device():
    tensor = torch.arange(3.)
    moved = host_to_device(tensor, torch.device('cpu'))
    moved.add_(1.)
    assert torch.equal(tensor, torch.arange(3.))


def test_cat_on_device_moves_what_is_elsewhere():
    """The meta device stands for a GPU: tensors already there and host tensors in one result."""
    joined = cat_on_device([torch.zeros(2, device = 'meta'), torch.arange(3.)], torch.device('meta'))
    assert joined.device.type == 'meta' and joined.shape == (5,)


@pytest.mark.gpu
def test_cat_on_device_keeps_the_order_across_devices():
    """Not seen failing here (no GPU): host tensors are moved in place, not gathered at the end."""
    a, b, c = torch.arange(2.), torch.arange(2., 5.), torch.arange(5., 6.)
    joined = cat_on_device([a.cuda(), b, c.cuda()], torch.device('cuda'))
    assert torch.equal(joined.cpu(), torch.arange(6.))

import pytest
import torch

from transfusion_pytorch import Transfusion


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason = 'needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse = True)
def seeded():
    torch.manual_seed(0)


def tiny_model(**overrides) -> Transfusion:
    """A small two-modality model: modality 0 is a 2-axis grid of 8-d latents, modality 1 a
    1-axis sequence of 4-d latents."""
    kwargs = dict(
        num_text_tokens = 16, dim_latent = (8, 4), modality_default_shape = ((2, 3), (3,)),
        transformer = dict(dim = 64, depth = 2, heads = 2, dim_head = 32),
    )
    kwargs.update(overrides)
    return Transfusion(**kwargs)


def mixed_batch():
    return [
        [torch.randint(0, 16, (5,)), torch.randn(2, 3, 8), torch.randint(0, 16, (3,))],
        [(1, torch.randn(4, 4)), torch.randint(0, 16, (2,)), (0, torch.randn(1, 2, 8))],
        [torch.randint(0, 16, (7,))],
    ]

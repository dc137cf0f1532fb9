import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps timings predictable.
torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Make a freshly built (identity) flow non-trivial: add small noise to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture
def data_dir() -> str:
    d = os.environ.get("FLOWCORE_DATA_DIR")
    if not d or not os.path.isdir(d):
        pytest.skip("set FLOWCORE_DATA_DIR to the folder holding fashion_mnist.npz etc. to run this test")
    return d

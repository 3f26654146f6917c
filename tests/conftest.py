"""Fixtures shared across test folders: the embedded digits and one trained LeNet-5 per session."""

import pytest
import torch

import torchslim as ts
from torchslim.train import RECOMMENDED


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    """Layer-path benchmarks are cached in a session directory, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path_factory.mktemp("torchslim-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def digits():
    """The embedded digits (seed 0 split)."""
    return ts.load_data("digits")


@pytest.fixture(scope="session")
def trained_lenet5(digits):
    """LeNet-5 trained with RECOMMENDED["lenet5"] from torch.manual_seed(0); tests must deepcopy before changing it."""
    torch.manual_seed(0)
    model = ts.create_model("lenet5")
    ts.train(model, digits.train, RECOMMENDED["lenet5"], progress=False)
    return model.eval()

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


class _Int8mmTimings(dict):
    """A stand-in for the runtime's timing cache: every int8-product signature reads ``timing``."""

    def __init__(self, timing: dict) -> None:
        super().__init__()
        self.timing = timing

    def get(self, key, default=None):
        return self.timing if key.startswith("int8mm-") else default


@pytest.fixture
def int8mm_timed(monkeypatch):
    """``int8mm_timed(dense_ms, int8mm_ms)``: what ``runtime='w8a8'`` measures for every layer shape (whether
    ``torch._int_mm`` is fast depends on the CPU: it has no fast kernel without VNNI)."""
    from torchslim.quantize import runtime

    def set_timing(dense_ms: float, int8mm_ms: float) -> None:
        monkeypatch.setattr(runtime, "_MEASURED", _Int8mmTimings({"dense_ms": dense_ms, "int8mm_ms": int8mm_ms}))
        monkeypatch.setattr(runtime, "_write_cache", lambda signature, timing: None)

    return set_timing

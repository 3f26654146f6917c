from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.measure import peak_memory_bytes


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))


def test_peak_includes_weights_and_grows_with_batch():
    model = mlp()
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    small = peak_memory_bytes(model, torch.randn(1, 256))
    big = peak_memory_bytes(model, torch.randn(64, 256))
    assert small is not None and big is not None
    assert small > weight_bytes
    # 63 more samples: at least 63 more hidden activations (1024 floats) are alive at once
    assert big - small >= 63 * 1024 * 4
    # and not absurdly more than input + two hidden-sized buffers + output per extra sample
    assert big - small <= 63 * (256 + 2 * 1024 + 10) * 4 * 1.5


def test_mode_restored():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)).train()
    assert peak_memory_bytes(model, torch.randn(4, 16)) is not None
    assert model.training and model[1].training


def test_nothing_allocated_gives_none_not_a_guess():
    assert peak_memory_bytes(nn.Identity(), torch.randn(4, 16)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_grows_with_batch():
    model = mlp().cuda()
    small = peak_memory_bytes(model, torch.randn(1, 256, device="cuda"))
    big = peak_memory_bytes(model, torch.randn(256, 256, device="cuda"))
    assert small >= sum(p.numel() * 4 for p in model.parameters())
    assert big - small >= 255 * 1024 * 4

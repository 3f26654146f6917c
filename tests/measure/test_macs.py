from __future__ import annotations

import torch
from torch import nn

from torchslim.measure import count_macs


def test_linear_macs_per_sample():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300))
    assert count_macs(model, torch.randn(1, 1, 28, 28)) == 784 * 300 == 235_200
    # a batch of inputs still counts one sample
    assert count_macs(model, torch.randn(16, 1, 28, 28)) == 235_200


def test_conv_and_linear_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = (8 * 16 * 16) * (3 * 3 * 3)  # output positions x MACs per output
    linear = 8 * 16 * 16 * 10
    assert count_macs(model, torch.randn(4, 3, 16, 16)) == conv + linear == 75_776


def test_grouped_conv_macs():
    model = nn.Conv2d(4, 4, 3, groups=4, bias=False)
    assert count_macs(model, torch.randn(1, 4, 8, 8)) == 4 * 6 * 6 * 9


def test_train_mode_restored_and_state_untouched():
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).train()
    before = model[1].running_mean.clone()
    # BatchNorm1d in train mode rejects a single sample: counting must run in eval mode
    assert count_macs(model, torch.randn(8, 5)) == 15
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)
    assert model[1].num_batches_tracked.item() == 0

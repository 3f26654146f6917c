"""Quantized conv layers keep the attributes model code reads from the conv they replace (stride, kernel_size ...)."""

import pytest
import torch
from torch import nn

import torchslim as ts


@pytest.mark.parametrize("config", [ts.IntQuant(bits=4), ts.HalfPrecision("fp16")])
def test_quantized_conv_exposes_the_conv_attributes(config):
    conv = nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4)
    model = nn.Sequential(conv)
    ts.quantize_(model, config)
    layer = model[0]
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == ((2, 1), (1, 2), (1, 2), 4)
    assert (layer.kernel_size, layer.in_channels, layer.out_channels) == ((3, 5), 8, 16)
    assert model(torch.randn(1, 8, 9, 9)).shape == (1, 16, 5, 5)


def test_quantized_linear_has_no_conv_attributes():
    model = nn.Sequential(nn.Linear(32, 8))
    ts.quantize_(model, ts.IntQuant(bits=4))
    assert not hasattr(model[0], "stride")

"""The parity check on outputs near zero (deep random-weight networks): cosine must not collapse to 0."""

import torch

from torchslim.onnx.convert import compare_outputs


def test_cosine_of_tiny_equal_outputs_is_one():
    expected = torch.randn(2, 10, generator=torch.Generator().manual_seed(0)) * 1e-25
    result = compare_outputs(expected, expected * (1 + 1e-6), atol=1e-4, min_cosine=0.9999)
    assert result["cosine"] > 0.9999

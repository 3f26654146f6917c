"""Multiply-accumulate count of one forward pass, from ``torch.utils.flop_counter``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim._utils import device_of, eval_mode
from torchslim.measure._common import call, first_samples, to_device


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Count the MACs of ``model`` on ONE sample.

    Uses ``FlopCounterMode`` (matmul, conv, attention ... as PyTorch counts them) under
    ``torch.no_grad`` in eval mode; every module's train/eval mode is restored afterwards.
    Element-wise ops (activations, pooling, normalisation) are not counted, as in most MAC tables.

    Args:
        model: the model.
        example_inputs: a tensor (or tuple of tensors) with a leading batch dimension; only the
            first sample (``example_inputs[:1]``) is used.

    Returns:
        MACs per sample: counted FLOPs // 2.

    Raises:
        DataError: if ``example_inputs`` is neither a tensor nor a tuple/list of tensors.
    """
    inputs = to_device(first_samples(example_inputs, 1), device_of(model))
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        call(model, inputs)
    return int(counter.get_total_flops()) // 2

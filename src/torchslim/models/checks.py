"""Checks on a model's own state that every stage runs before it changes or writes anything."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim._utils import device_of, eval_mode, first_line
from torchslim.errors import DataError, ModelError


def check_finite_weights(
    model: nn.Module, where: str, *, recurse: bool = True, prefix: str = "", hint: str = ""
) -> None:
    """Refuse a model whose floating-point parameters hold NaN or Inf.

    Buffers are not checked (some models keep ``-inf`` attention masks there on purpose).

    Args:
        model: the model (or one layer of it).
        where: what is refusing, for the message (``"quantize_"``, ``"save('m.slim')"``).
        recurse: check submodules' parameters too (False: only the module's own).
        prefix: prepended to parameter names in the message (the layer's name in its model).
        hint: what the user can do instead, appended to the message.

    Raises:
        ModelError: naming the first bad parameter and how many of its values are not finite.
    """
    for name, param in model.named_parameters(recurse=recurse):
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        data = param.detach()
        if bool(torch.isfinite(data.sum())):  # fast path: one reduction, no temporary mask
            continue
        bad = int((~torch.isfinite(data)).sum())
        if not bad:  # the sum overflowed, every value is finite
            continue
        full = f"{prefix}.{name}" if prefix else name
        raise ModelError(
            f"{where}: parameter {full!r} holds {bad} NaN/Inf value(s) out of {data.numel()}; refusing to work "
            f"on non-finite weights (a diverged training run?): retrain or repair the model first{hint}"
        )


def check_inputs_fit(model: nn.Module, inputs: Any, where: str) -> None:
    """Run one forward pass (eval mode, no grad) to check that ``inputs`` fit the model.

    Every module's train/eval mode is restored afterwards, and BatchNorm statistics are untouched.

    Args:
        model: the model.
        inputs: a tensor, or a tuple/list of positional tensor inputs (moved to the model's device);
            anything else is not checked.
        where: what is checking, for the message (``"prune_"``).

    Raises:
        DataError: the forward pass fails; the message gives the input shapes and the model's complaint.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return  # other forms are the caller's to validate
    device = device_of(model)
    if device.type != "meta":
        args = tuple(a.to(device) for a in args)
    shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise DataError(
            f"{where}: example_inputs of shape {shapes} do not fit the model ({first_line(exc)}); expected a batch "
            "of the inputs the model was built for"
        ) from exc

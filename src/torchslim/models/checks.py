"""Checks on a model's own state that every stage runs before it changes or writes anything."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.errors import ModelError


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
        if bool(torch.isfinite(data).all()):
            continue
        bad = int((~torch.isfinite(data)).sum())
        full = f"{prefix}.{name}" if prefix else name
        raise ModelError(
            f"{where}: parameter {full!r} holds {bad} NaN/Inf value(s) out of {data.numel()}; refusing to work "
            f"on non-finite weights (a diverged training run?): retrain or repair the model first{hint}"
        )

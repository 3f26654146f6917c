"""The uncompressed model a compressed one is timed against, rebuilt from the factory in its manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.artifact import read_manifest
from torchslim.models.registry import BUILTIN_PREFIX, create_model, factory_of

__all__ = ["factory_baseline"]


def factory_baseline(item: Any) -> tuple[nn.Module | None, str]:
    """The fp32 model rebuilt from a .slim manifest's (or a module's) factory, with fresh weights.

    Weights do not change dense fp32 speed, so fresh ones are enough for timing (not for accuracy). For an int8
    ``OnnxGraph`` the factory is that of the model it was made from.

    Args:
        item: a ``.slim`` path or a module made by ``torchslim.create_model`` (anything else gives no baseline).

    Returns:
        ``(model in eval mode, how it was made)``, or ``(None, "")`` when there is no torchslim factory to rebuild.
    """
    if isinstance(item, (str, os.PathLike)) and Path(item).suffix != ".onnx":
        factory = read_manifest(item).get("factory")
    elif isinstance(item, nn.Module):
        factory = factory_of(item)
    else:
        return None, ""
    if factory and factory.get("name") == BUILTIN_PREFIX + "onnx_graph":
        factory = (factory.get("kwargs") or {}).get("source_factory")
    if not factory or not str(factory.get("name", "")).startswith(BUILTIN_PREFIX):
        return None, ""
    torch.manual_seed(0)
    model = create_model(factory["name"], **(factory.get("kwargs") or {})).eval()
    return model, f"{factory['name']} rebuilt from its factory with fresh fp32 weights (uncompressed architecture)"

"""Optional GPU kernels (Triton), imported lazily: ``import torchslim.kernels`` does not import triton.

``lowbit_linear(x, layer)`` runs a linear ``IntQuantLayer`` on its packed 4/8-bit weights;
``IntQuantLayer.forward`` dispatches to it for float16/bfloat16 CUDA inputs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "lowbit_linear": "torchslim.kernels.lowbit",
    "KernelConfig": "torchslim.kernels.lowbit",
    "dispatch_reason": "torchslim.kernels.lowbit",
    "unsupported_reason": "torchslim.kernels.lowbit",
    "triton_available": "torchslim.kernels.lowbit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchslim.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

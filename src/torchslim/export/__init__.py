"""Export to ONNX and run in ONNX Runtime (imported lazily: ``import torchslim`` never imports it)."""

from __future__ import annotations

from torchslim.export.onnx import DEFAULT_OPSET, check_parity, export_onnx, run_onnx
from torchslim.export.runtime import (
    graph_op_types,
    optimized_op_types,
    ort_session,
    require_onnx,
    require_onnxruntime,
)

__all__ = [
    "DEFAULT_OPSET",
    "check_parity",
    "export_onnx",
    "graph_op_types",
    "optimized_op_types",
    "ort_session",
    "require_onnx",
    "require_onnxruntime",
    "run_onnx",
]

"""Export to ONNX and run in ONNX Runtime (imported lazily: ``import torchslim`` never imports it)."""

from __future__ import annotations

from torchslim._callable_module import make_module_callable
from torchslim.export.api import QUANT_MODES, ExportConfig, ExportReport, choose_opset, export
from torchslim.onnx.convert import DEFAULT_OPSET, check_parity, export_onnx, run_onnx
from torchslim.onnx.runtime import (
    graph_op_types,
    optimized_op_types,
    ort_session,
    require_onnx,
    require_onnxruntime,
)

__all__ = [
    "DEFAULT_OPSET",
    "QUANT_MODES",
    "ExportConfig",
    "ExportReport",
    "check_parity",
    "choose_opset",
    "export",
    "export_onnx",
    "graph_op_types",
    "optimized_op_types",
    "ort_session",
    "require_onnx",
    "require_onnxruntime",
    "run_onnx",
]

# ``import torchslim.export`` rebinds ``torchslim.export`` to this package; calls go on to the function ``export``.
make_module_callable(__name__, "export")

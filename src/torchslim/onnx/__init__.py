"""ONNX plumbing shared by quantize, export, models and measure: sessions, fp32 export, feeding and parity.

A low layer: it imports only ``torchslim.errors`` and ``torchslim.fileio``; onnx and onnxruntime are imported when a
function here runs, never on import.
"""

from torchslim.onnx.convert import (
    DEFAULT_OPSET,
    check_parity,
    compare_outputs,
    export_onnx,
    feed_array,
    io_names,
    run_onnx,
)
from torchslim.onnx.runtime import (
    OPTIMIZATION_LEVELS,
    graph_op_types,
    optimized_op_types,
    ort_session,
    require_onnx,
    require_onnxruntime,
)

__all__ = [
    "DEFAULT_OPSET",
    "OPTIMIZATION_LEVELS",
    "check_parity",
    "compare_outputs",
    "export_onnx",
    "feed_array",
    "graph_op_types",
    "io_names",
    "optimized_op_types",
    "ort_session",
    "require_onnx",
    "require_onnxruntime",
    "run_onnx",
]

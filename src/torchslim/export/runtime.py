"""Moved to :mod:`torchslim.onnx.runtime` (quantize and models use it too); this path stays importable."""

from torchslim.onnx.runtime import (  # noqa: F401
    OPTIMIZATION_LEVELS,
    graph_op_types,
    optimized_op_types,
    ort_session,
    require_onnx,
    require_onnxruntime,
)

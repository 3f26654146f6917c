"""Moved to :mod:`torchslim.onnx.convert` (quantize and models use it too); this path stays importable."""

from torchslim.onnx.convert import (  # noqa: F401
    DEFAULT_OPSET,
    check_parity,
    compare_outputs,
    export_onnx,
    feed_array,
    io_names,
    run_onnx,
)

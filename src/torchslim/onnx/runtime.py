"""ONNX Runtime sessions, imported lazily: ``import torchslim`` never imports onnxruntime.

Also answers "which kernels does ONNX Runtime really run?": :func:`optimized_op_types` returns the
node types of the graph after ORT's own optimizations, where a QDQ pair around a Conv has become
one ``QLinearConv`` (an int8 kernel) and a dynamically quantized MatMul a ``DynamicQuantizeMatMul``.
"""

from __future__ import annotations

import collections
import importlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from torchslim._utils import first_line
from torchslim.errors import MissingDependencyError, TorchSlimError

# graph_optimization_level names accepted by ort_session
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def require_onnxruntime() -> ModuleType:
    """Import and return ``onnxruntime``.

    Raises:
        MissingDependencyError: if it is not installed (the message says ``pip install onnxruntime``).
    """
    return _require("onnxruntime", "onnxruntime", "run ONNX graphs and int8 quantization")


def require_onnx() -> ModuleType:
    """Import and return ``onnx``.

    Raises:
        MissingDependencyError: if it is not installed (the message says ``pip install onnx``).
    """
    return _require("onnx", "onnx", "read and write ONNX graphs")


def _require(module: str, package: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed to {purpose} but is not installed: pip install {package}"
        ) from exc


def ort_session(
    onnx_bytes: bytes,
    num_threads: int | None = None,
    *,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike | None = None,
) -> Any:
    """Create an ``onnxruntime.InferenceSession`` on the CPU execution provider.

    Args:
        onnx_bytes: a serialised ONNX model.
        num_threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        optimization: graph optimization level, one of ``OPTIMIZATION_LEVELS``.
        optimized_model_path: if given, ORT writes the optimized graph there (for inspection).

    Returns:
        The session.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        TorchSlimError: a bad thread count or level, or ORT cannot load the graph (its message is kept).
    """
    ort = require_onnxruntime()
    if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                    or num_threads < 1):
        raise TorchSlimError(f"num_threads = {num_threads!r} is invalid: expected None or an integer >= 1")
    if optimization not in OPTIMIZATION_LEVELS:
        raise TorchSlimError(
            f"optimization = {optimization!r} is invalid: expected one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    levels = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "all": levels.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 3  # errors only: no warnings about unused initializers and the like
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(bytes(onnx_bytes), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise TorchSlimError(
            f"onnxruntime cannot load the ONNX graph ({len(onnx_bytes)} bytes): {first_line(exc)}"
        ) from exc


def exposed_values(model: Any, names: list[str], inputs: Any, step: int) -> Iterator[dict[str, Any]]:
    """Run an fp32 ONNX graph on ``inputs``, ``step`` samples at a time, with the named tensors made outputs.

    Args:
        model: the ``ModelProto`` (not changed: a copy gets the extra outputs).
        names: tensors to expose (the graph input may be one of them).
        inputs: the samples, batch first (a CPU tensor).
        step: samples per run.

    Returns:
        An iterator of ``{name: numpy array}`` per run, for the names the graph has.
    """
    onnx = require_onnx()
    from onnx import helper

    input_name = model.graph.input[0].name
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in names:
        if name != input_name and name not in present:
            augmented.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session(augmented.SerializeToString(), optimization="basic")
    outputs = [o.name for o in session.get_outputs() if o.name in set(names)]
    for start in range(0, inputs.shape[0], step):
        batch = inputs[start : start + step].numpy()
        values = dict(zip(outputs, session.run(outputs, {input_name: batch}), strict=True))
        if input_name in names:
            values[input_name] = batch
        yield values


def graph_op_types(onnx_bytes: bytes) -> collections.Counter:
    """Count the node types of a serialised ONNX graph (as stored, before ORT optimizes it).

    Raises:
        MissingDependencyError: onnx is not installed.
    """
    onnx = require_onnx()
    model = onnx.load_from_string(bytes(onnx_bytes))
    return collections.Counter(node.op_type for node in model.graph.node)


def optimized_op_types(onnx_bytes: bytes, *, optimization: str = "extended") -> collections.Counter:
    """Count the node types ONNX Runtime executes after its graph optimizations.

    At ``"extended"`` (the default) ORT's CPU provider fuses QDQ patterns into int8 kernels
    (``QLinearConv``, ``QGemm``, ``QLinearMatMul``) and ``DynamicQuantizeLinear + MatMulInteger`` into
    ``DynamicQuantizeMatMul``, without the hardware-specific layout changes of ``"all"``.

    Args:
        onnx_bytes: a serialised ONNX model.
        optimization: the level to inspect (see :func:`ort_session`).

    Returns:
        ``Counter`` of op types of the optimized graph.

    Raises:
        MissingDependencyError: onnx or onnxruntime is not installed.
        TorchSlimError: ORT cannot load the graph.
    """
    onnx = require_onnx()
    with tempfile.TemporaryDirectory(prefix="torchslim-ort-") as directory:
        path = Path(directory) / "optimized.onnx"
        ort_session(onnx_bytes, 1, optimization=optimization, optimized_model_path=path)
        model = onnx.load(str(path))
    return collections.Counter(node.op_type for node in model.graph.node)

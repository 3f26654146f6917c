"""SmoothQuant on an fp32 ONNX graph: move activation outliers into the weights before static int8 quantization.

A Linear layer's input often has a few channels far larger than the rest; one int8 scale for the whole tensor
then leaves the small channels a handful of levels. SmoothQuant (Xiao et al., 2023) divides each input channel j
by ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's input row j by ``s_j``: the float
product is unchanged, the activation is flatter, and per-channel int8 weights absorb the larger rows.

The division is folded into the producing LayerNormalization's scale and bias where only the smoothed layers
read its output (pre-norm transformers' attention and FFN inputs); elsewhere it is a ``Mul`` by ``1 / s`` inserted
before the MatMul/Gemm consumers of the activation (other consumers, such as a residual addition, keep reading the
original tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from torchslim.onnx.runtime import exposed_values, require_onnx

__all__ = ["smooth_graph"]

_SCALE_LIMITS = (1e-5, 1e5)  # factors outside this range come from dead channels, not outliers


def smooth_graph(model: Any, inputs: Tensor, alpha: float, step: int) -> dict[str, int]:
    """Apply SmoothQuant to every MatMul/Gemm with a constant 2-D weight, in place.

    Args:
        model: an fp32 ``ModelProto`` with shapes inferred (ORT's quantization pre-processing output).
        inputs: calibration samples, batch first (the per-channel maxima come from them).
        alpha: migration strength in (0, 1]: 0 would leave the activation as it is, 1 moves all of its range
            into the weight.
        step: samples per ONNX Runtime run.

    Returns:
        ``{activation name: number of layers smoothed}`` for each activation smoothed (its division folded into a
        LayerNorm or a ``Mul``).
    """
    groups = _smoothable(model)
    if not groups:
        return {}
    maxima: dict[str, np.ndarray] = {}
    for values in exposed_values(model, list(groups), inputs, step):
        for name, value in values.items():
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = channel_max if name not in maxima else np.maximum(maxima[name], channel_max)
    weights = {init.name: init for init in model.graph.initializer}
    done = {}
    for name, consumers in groups.items():
        if name not in maxima:
            continue
        arrays = [_input_major(weights[node.input[1]], node) for node in consumers]
        weight_max = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        scale = _factors(maxima[name], weight_max, alpha)
        if not _fold_into_layer_norm(model, name, consumers, scale):
            _insert_division(model, name, consumers, scale)
        for node, array in zip(consumers, arrays, strict=True):
            _store_input_major(weights[node.input[1]], node, array * scale[:, None])
        done[name] = len(consumers)
    return done


def _smoothable(model: Any) -> dict[str, list[Any]]:
    """Activations read as the first input of a MatMul/Gemm with a constant 2-D weight used by no other node,
    with those nodes (a Gemm that transposes its first input is left alone)."""
    from onnx import helper

    initializers = {init.name: init for init in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        activation, weight = node.input[0], node.input[1]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (activation in initializers or weight not in initializers or uses[weight] != 1
                or len(initializers[weight].dims) != 2 or attributes.get("transA", 0)):
            continue
        groups.setdefault(activation, []).append(node)
    return groups


def _transposed(node: Any) -> bool:
    """Whether the node stores its weight as ``(out_features, in_features)`` (a Gemm with ``transB``)."""
    from onnx import helper

    return node.op_type == "Gemm" and any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)


def _input_major(initializer: Any, node: Any) -> np.ndarray:
    """The weight as ``(in_features, out_features)``."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(initializer)
    return array.T if _transposed(node) else array


def _store_input_major(initializer: Any, node: Any, array: np.ndarray) -> None:
    """Write an ``(in_features, out_features)`` array back in the node's own layout."""
    from onnx import numpy_helper

    stored = np.ascontiguousarray(array.T if _transposed(node) else array, dtype=np.float32)
    initializer.CopyFrom(numpy_helper.from_array(stored, initializer.name))


def _factors(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """``max|x|^alpha / max|W|^(1-alpha)`` per input channel; 1 for channels never active or without weights."""
    live = (activation_max > 0) & (weight_max > 0)
    scale = np.ones_like(activation_max, dtype=np.float64)
    scale[live] = activation_max[live].astype(np.float64) ** alpha / weight_max[live].astype(np.float64) ** (1 - alpha)
    return np.clip(scale, *_SCALE_LIMITS).astype(np.float32)


def _fold_into_layer_norm(model: Any, name: str, consumers: list[Any], scale: np.ndarray) -> bool:
    """Divide a LayerNormalization's scale and bias by ``scale`` when ``name`` is its output and only
    ``consumers`` read it (no extra node to run); returns whether it did."""
    from onnx import numpy_helper

    producer = next((node for node in model.graph.node if name in node.output), None)
    if producer is None or producer.op_type != "LayerNormalization" or producer.output[0] != name:
        return False
    readers = [node for node in model.graph.node if name in node.input]
    if len(readers) != len(consumers) or name in {o.name for o in model.graph.output}:
        return False
    initializers = {init.name: init for init in model.graph.initializer}
    parameters = [p for p in producer.input[1:3] if p]
    uses = [sum(p in node.input for node in model.graph.node) for p in parameters]
    if any(p not in initializers for p in parameters) or any(u != 1 for u in uses):
        return False
    for parameter in parameters:
        array = numpy_helper.to_array(initializers[parameter]) / scale
        initializers[parameter].CopyFrom(numpy_helper.from_array(array.astype(np.float32), parameter))
    return True


def _insert_division(model: Any, name: str, consumers: list[Any], scale: np.ndarray) -> None:
    """A ``Mul`` by ``1 / scale`` on ``name``, read by ``consumers`` instead of ``name``."""
    onnx = require_onnx()
    from onnx import helper, numpy_helper

    smoothed = f"{name}_smoothquant"
    model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), smoothed + "_inverse"))
    mul = helper.make_node("Mul", [name, smoothed + "_inverse"], [smoothed], name=smoothed)
    nodes = list(model.graph.node)
    position = min(nodes.index(node) for node in consumers)  # after the producer, before the first reader
    model.graph.node.insert(position, mul)
    for node in consumers:
        node.input[0] = smoothed
    shape = next((vi for vi in model.graph.value_info if vi.name == name), None)
    info = helper.make_tensor_value_info(smoothed, onnx.TensorProto.FLOAT, None)
    if shape is not None:
        info.type.CopyFrom(shape.type)
    model.graph.value_info.append(info)

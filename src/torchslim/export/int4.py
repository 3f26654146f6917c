"""4-bit weight-only ONNX graphs for ONNX Runtime's ``MatMulNBits`` (com.microsoft contrib op).

``MatMulNBits(A, B, scales, zero_points)`` computes ``A @ dequant(B)`` where the weight ``(K, N)`` is stored
per output column ``n`` in blocks of ``block_size`` rows: ``B`` is uint8 ``(N, K / block_size, block_size / 2)``
(two 4-bit codes a byte, the low nibble first), ``scales`` ``(N * blocks,)`` in the input's float type,
``zero_points`` uint8 ``(N * ceil(blocks / 2),)`` packed the same way (absent: 8), and
``W[k, n] = (code - zero_point) * scale`` — the same affine form, order and nibble packing as a torchslim
``IntQuantLayer`` with ``bits=4``, group granularity (group = block) and rows = output features. So a packed
4-bit Linear layer is written with its own codes, scales and zero points: no re-quantization, the same weights.
``block_size`` must be a power of two >= 16.

Linear layers that are not packed that way (fp32, other bit widths, per-tensor scales, groups that are not a
power of two) are quantized from their float weights by ONNX Runtime's ``MatMulNBitsQuantizer`` (round to
nearest, per block). Convolutions stay fp32: ``MatMulNBits`` covers MatMul/Gemm only.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.onnx.runtime import require_onnx
from torchslim.quantize.layers import IntQuantLayer, _WeightOnlyLayer
from torchslim.quantize.packing import pack

__all__ = [
    "gemm_to_matmul",
    "matmulnbits_reason",
    "ort_weight_only",
    "pack_matmulnbits",
]

MIN_BLOCK = 16


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def matmulnbits_reason(layer: IntQuantLayer) -> str | None:
    """Why ``layer``'s packed codes cannot be written as one ``MatMulNBits`` as they are (None: they can).

    Args:
        layer: a torchslim packed layer.

    Returns:
        None when the layer is a 4-bit Linear with group (or per-channel) scales over blocks of a power of two
        >= 16 input features; otherwise the reason, for the export report.
    """
    if layer.op != "linear":
        return f"{layer.op} stays fp32 (MatMulNBits covers MatMul/Gemm only)"
    if layer.bits != 4:
        return f"{layer.bits}-bit codes: MatMulNBits is written from 4-bit codes only; re-quantized to 4 bits"
    fan_in = layer.weight_shape[1]
    block = layer.group_size if layer.granularity == "group" else fan_in if layer.granularity == "channel" else None
    if block is None:
        return "per-tensor scales: MatMulNBits needs per-block scales; re-quantized per block"
    if not _is_power_of_two(block) or block < MIN_BLOCK:
        return f"block of {block} inputs: MatMulNBits needs a power of two >= {MIN_BLOCK}; re-quantized per block"
    return None


def _block_size(layer: IntQuantLayer) -> int:
    return layer.group_size if layer.granularity == "group" else layer.weight_shape[1]


def _digest(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(str(data.shape).encode() + data.tobytes()).hexdigest()


def weight_digests(layers: dict[str, IntQuantLayer]) -> dict[str, str]:
    """``{digest of the transposed (K, N) dequantized weight: layer name}``, to find each layer in a graph."""
    return {
        _digest(layer.dequantize_weight(torch.float32).detach().cpu().numpy().T): name for name, layer in layers.items()
    }


def _initializers(graph: Any) -> dict[str, Any]:
    return {init.name: init for init in graph.initializer}


def gemm_to_matmul(model: Any) -> int:
    """Rewrite each ``Gemm`` with a constant weight (an exported ``nn.Linear``) as ``MatMul`` + ``Add``, in place.

    ``MatMulNBits`` and ONNX Runtime's weight-only quantizer take a ``MatMul`` with a ``(K, N)`` weight; the
    TorchScript exporter writes 2-D Linear layers as ``Gemm(X, W, b, transB=1)``.

    Args:
        model: an ``onnx.ModelProto`` (changed in place).

    Returns:
        The number of rewritten nodes.
    """
    onnx = require_onnx()
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    rewritten = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        stem = node.name or f"gemm_{rewritten}"
        weight_name = f"{node.input[1]}_kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{stem}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{stem}_bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    if rewritten:
        onnx.checker.check_model(model)
    return rewritten


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _matmulnbits_tensors(layer: IntQuantLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The ``B``, ``scales`` and ``zero_points`` initializers of ``MatMulNBits`` from a packed layer's own state."""
    rows, blocks, block = layer._grouped_shape()
    codes = layer.codes().detach().cpu()  # (N, blocks, block), unsigned 4-bit, padding included
    packed = pack(codes, 4).numpy().reshape(rows, blocks, block // 2)
    scales = layer.scale.detach().cpu().to(torch.float32).numpy().reshape(-1)  # fp16 -> fp32 is exact
    if layer.symmetric:  # torchslim's symmetric zero point is 2**(bits-1) = 8, MatMulNBits' default
        return packed, scales, None
    zero_points = layer.zero_points().detach().cpu()
    if blocks % 2:
        zero_points = torch.nn.functional.pad(zero_points, (0, 1))
    return packed, scales, pack(zero_points, 4).numpy()


def pack_matmulnbits(model: Any, layers: dict[str, IntQuantLayer], *, accuracy_level: int) -> list[str]:
    """Replace the ``MatMul`` of each packed 4-bit layer with a ``MatMulNBits`` holding the layer's codes, in place.

    Each layer is found by its weight: the ``(K, N)`` initializer equal to its transposed dequantized weight (the
    graph was exported from a copy with these layers replaced by fp32 Linear layers holding exactly those values).

    Args:
        model: an ``onnx.ModelProto`` whose Linear layers are ``MatMul`` nodes (see :func:`gemm_to_matmul`).
        layers: name -> packed layer, each accepted by :func:`matmulnbits_reason`.
        accuracy_level: ``MatMulNBits``' ``accuracy_level`` (0: unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute).

    Returns:
        The names of the layers written as ``MatMulNBits``.
    """
    require_onnx()
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    digests = weight_digests(layers)
    done: list[str] = []
    nodes = []
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = digests.get(_digest(numpy_helper.to_array(init))) if init is not None and len(init.dims) == 2 else None
        if name is None:
            nodes.append(node)
            continue
        layer = layers[name]
        packed, scales, zero_points = _matmulnbits_tensors(layer)
        stem = name.replace(".", "_") or "layer"
        inputs = [node.input[0], f"{stem}_q4", f"{stem}_scales"]
        graph.initializer.append(numpy_helper.from_array(packed, inputs[1]))
        graph.initializer.append(numpy_helper.from_array(scales, inputs[2]))
        if zero_points is not None:
            inputs.append(f"{stem}_zero_points")
            graph.initializer.append(numpy_helper.from_array(zero_points, inputs[3]))
        attrs = {"K": layer.weight_shape[1], "N": layer.weight_shape[0], "bits": 4, "block_size": _block_size(layer)}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(
            helper.make_node(
                "MatMulNBits", inputs, list(node.output), name=f"{stem}_MatMulNBits", domain="com.microsoft", **attrs
            )
        )
        done.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    if done:
        _ensure_contrib_domain(model)
    return done


def _ensure_contrib_domain(model: Any) -> None:
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def ort_weight_only(model: Any, *, block_size: int, symmetric: bool, accuracy_level: int) -> Any:
    """Quantize every remaining ``MatMul`` with a constant 2-D weight to 4 bits with ONNX Runtime's quantizer.

    Args:
        model: an ``onnx.ModelProto`` (Linear layers as ``MatMul``).
        block_size: weights per block along K (a power of two >= 16).
        symmetric: zero point fixed at 8 (else one per block).
        accuracy_level: as in :func:`pack_matmulnbits`.

    Returns:
        The quantized ``ModelProto``.
    """
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level or None,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    result = quantizer.model.model
    _ensure_contrib_domain(result)
    return result


def dequantized_copy(model: nn.Module) -> tuple[nn.Module, dict[str, IntQuantLayer]]:
    """A copy of ``model`` whose packed layers are plain fp32 ``nn.Linear``/``nn.Conv`` with the same weights.

    Exporters would otherwise trace the unpacking arithmetic into the graph. The packed layers (``IntQuantLayer``
    only) are returned by name, for :func:`pack_matmulnbits`.

    Args:
        model: any model (not changed).

    Returns:
        ``(copy, {name: original IntQuantLayer})``.
    """
    clone = copy.deepcopy(model)
    packed: dict[str, IntQuantLayer] = {}
    for name, module in list(clone.named_modules()):
        if not isinstance(module, _WeightOnlyLayer):
            continue
        if isinstance(module, IntQuantLayer):
            packed[name] = module
        clone.set_submodule(name, module.to_float())
    return clone, packed

"""Static (W8A8) and dynamic int8 quantization, executed by ONNX Runtime's int8 kernels.

Both functions export the fp32 model to ONNX, quantize the graph with ONNX Runtime's quantizer and
return an :class:`~torchslim.models.onnx_graph.OnnxGraph`: a module whose ``.slim`` file stores the
int8 graph's bytes and whose ``forward`` runs it (``runtime == "onnxruntime"``).

- :func:`quantize_static`: QDQ format, int8 weights (per output channel by default) and 8-bit
  activations whose ranges come from calibration data through our observers (min-max, percentile
  or MSE; see :mod:`torchslim.quantize.observers`), passed to ORT as ``TensorQuantOverrides``. ORT's
  CPU provider fuses each ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into ``QLinearConv`` /
  ``QGemm``, so convolutions and matmuls run in int8.
- :func:`quantize_dynamic`: int8 weights, activations quantized per batch at run time
  (``DynamicQuantizeLinear`` + ``MatMulInteger``, fused by ORT into ``DynamicQuantizeMatMul``). Only
  Linear layers (ONNX ``MatMul``/``Gemm`` with constant weights; ORT's dynamic quantizer turns
  ``Gemm`` into ``MatMul + Add`` itself) are quantized; convolutions stay fp32, as in PyTorch's
  dynamic quantization (ORT's ``ConvInteger`` is several times slower than its fp32 Conv here).

Nodes left in fp32 are listed with the reason in ``graph.skipped``; the parity check against the
fp32 model is in ``graph.parity``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, ModelError, TorchSlimError
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.models.registry import factory_of
from torchslim.onnx.convert import check_parity, export_onnx
from torchslim.onnx.runtime import exposed_values, require_onnx, require_onnxruntime
from torchslim.quantize.observers import OBSERVERS, create_observer
from torchslim.quantize.smoothquant import smooth_graph

__all__ = ["DynamicInt8", "StaticInt8", "quantize_dynamic", "quantize_static", "quantize_to_graph"]

_CALIBRATION_BATCH = 64
# top-1 agreement of the int8 graph with the fp32 model on the calibration samples
STATIC_MIN_AGREEMENT = 0.9
# StaticInt8.ops -> ONNX Runtime's op_types_to_quantize (None: every op type it can quantize)
STATIC_OPS: dict[str, list[str] | None] = {"all": None, "matmul": ["MatMul", "Gemm"]}
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _check_bool(config: Config, field: str) -> None:
    value = getattr(config, field)
    if not isinstance(value, bool):
        raise config.fail(field, value, "True or False")


@register_config("int8-static")
@dataclasses.dataclass(frozen=True)
class StaticInt8(Config):
    """Static int8 (W8A8) post-training quantization, run by ONNX Runtime (QDQ).

    Args:
        observer: how activation ranges are chosen from calibration data: ``"minmax"``, ``"mean-minmax"``
            (the mean of each sample's extremes), ``"percentile"`` or ``"mse"``.
        percentile: the percentile for ``"percentile"``, in (50, 100].
        per_channel: int8 weights with one scale per output channel (else one per tensor).
        calibration_samples: how many samples of the calibration data to use (>= 1).
        symmetric_activations: int8 activations with zero point 0, except lopsided ones (ReLU, GELU, Softmax
            outputs: uint8 over their own range); else uint8 asymmetric, except the right operand of an activation
            x activation MatMul (int8, zero point 0). See ``_activation_overrides``.
        ops: which nodes get int8: ``"all"`` (every node ONNX Runtime's quantizer can take: Conv, MatMul/Gemm,
            pooling, Add ...) or ``"matmul"`` (MatMul/Gemm only, the placement NNCF's transformer preset uses:
            LayerNorm, Softmax, GELU and residual additions stay float and read float tensors, and so does
            attention's probabilities x values product; on a BERT-shaped encoder run by OpenVINO it was faster and
            closer to fp32 than ``"all"``).
        reduce_range: weights rounded to 7 bits, as in :class:`DynamicInt8` (ONNX Runtime's int8 products saturate
            16-bit sums on x86 CPUs without VNNI): on such a CPU a ResNet-18's cosine to fp32 went from 0.99968 to
            0.99989 at the same speed (scratch run, 2026-12-03). Set False only for CPUs with VNNI or ARM.
        smooth_quant: SmoothQuant's migration strength alpha in (0, 1] (see
            :mod:`~torchslim.quantize.smoothquant`): each MatMul/Gemm input is divided per channel by
            ``max|x|^alpha / max|W|^(1-alpha)`` and the weight multiplied by it before calibration; None (default)
            leaves the graph as exported. Pays on transformers, whose LayerNorm outputs have outlier channels.
    """

    stage = "quantize"
    produces_graph = True
    needs_calibration = True

    observer: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    calibration_samples: int = 256
    symmetric_activations: bool = False
    ops: str = "all"
    reduce_range: bool = True
    smooth_quant: float | None = None

    def validate(self) -> None:
        self.check_choice("observer", OBSERVERS)
        self.check_float("percentile", 50, 100, lo_inclusive=False)
        _check_bool(self, "per_channel")
        self.check_int("calibration_samples", 1)
        _check_bool(self, "symmetric_activations")
        self.check_choice("ops", STATIC_OPS)
        _check_bool(self, "reduce_range")
        if self.smooth_quant is not None:
            self.check_float("smooth_quant", 0, 1, lo_inclusive=False)


@register_config("int8-dynamic")
@dataclasses.dataclass(frozen=True)
class DynamicInt8(Config):
    """Dynamic int8 quantization of Linear layers, run by ONNX Runtime (``MatMulInteger``).

    Args:
        per_channel: int8 weights with one scale per output channel (else one per tensor).
        reduce_range: weights rounded to 7 bits (-64..63). On x86 CPUs without VNNI, ONNX Runtime multiplies uint8
            activations by int8 weights with an instruction whose 16-bit sums saturate; 7-bit weights keep them in
            range. Off, the cosine to fp32 fell to 0.954-0.989 on 6 of 33 random-weight architectures on an AVX2
            CPU (``benchmarks/coverage.py``, 2026-12-03); on, >= 0.999. Set False only for CPUs with VNNI or ARM.
    """

    stage = "quantize"
    produces_graph = True

    per_channel: bool = True
    reduce_range: bool = True

    def validate(self) -> None:
        _check_bool(self, "per_channel")
        _check_bool(self, "reduce_range")


# --- calibration data ---------------------------------------------------------------------------
def calibration_inputs(data: Any, limit: int) -> Tensor:
    """Take up to ``limit`` input samples from calibration data.

    Args:
        data: a Tensor of inputs, a ``TensorDataset``/``Dataset`` of ``(x, y)`` or ``x`` samples, a
            ``DataLoader``, or ``DataSplits`` (its ``train`` split is used).
        limit: the most samples to take.

    Returns:
        A float32 tensor ``(N, ...)`` with ``1 <= N <= limit``.

    Raises:
        DataError: an unsupported type, or no samples.
    """
    if not isinstance(data, (Tensor, Dataset, DataLoader)) and hasattr(data, "train"):
        data = data.train
    if isinstance(data, TensorDataset):
        data = data.tensors[0]
    if isinstance(data, Tensor):
        inputs = data[:limit]
    elif isinstance(data, (Dataset, DataLoader)):
        batches: list[Tensor] = []
        taken = 0
        items = iter(data) if isinstance(data, DataLoader) else (data[i] for i in range(len(data)))
        for item in items:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, Tensor):
                raise DataError(f"calibration data yields {type(x).__name__} inputs: expected tensors")
            x = x if isinstance(data, DataLoader) else x.unsqueeze(0)
            batches.append(x[: limit - taken])
            taken += batches[-1].shape[0]
            if taken >= limit:
                break
        inputs = torch.cat(batches) if batches else torch.empty(0)
    else:
        raise DataError(
            f"calibration data is a {type(data).__name__}: expected a Tensor, a Dataset, a DataLoader or "
            "DataSplits"
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise DataError("calibration data is empty: expected at least one input sample")
    return inputs.detach().to("cpu", torch.float32)


def _example(example_inputs: Any) -> Tensor:
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() == 0 or example_inputs.shape[0] == 0:
        raise DataError(
            f"example_inputs = {type(example_inputs).__name__} is invalid: expected a tensor with a leading "
            "batch dimension of at least one sample"
        )
    return example_inputs.detach().to("cpu", torch.float32)


def _example_tuple(example_inputs: Any) -> Tensor | tuple[Tensor, ...]:
    """A tensor (as ``_example``) or a tuple of tensors, e.g. ``(input_ids, attention_mask)`` (dtypes kept)."""
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] > 0 for t in example_inputs
    ):
        return tuple(t.detach().to("cpu") for t in example_inputs)
    if isinstance(example_inputs, Tensor) and not example_inputs.is_floating_point() and example_inputs.dim() > 0:
        return example_inputs.detach().to("cpu")  # token ids stay integers
    return _example(example_inputs)


# --- ONNX helpers -------------------------------------------------------------------------------
@contextlib.contextmanager
def _working_directory(directory: Path):
    """Run the block with ``directory`` as the working directory (process-wide), then restore it."""
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(onnx_bytes: bytes, directory: Path) -> Any:
    """ORT's recommended pre-processing (shape inference, graph optimization); returns a ModelProto."""
    onnx = require_onnx()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = (directory / "preprocessed.onnx").resolve()
    try:
        # ORT prints why symbolic inference gave up and saves the half-inferred graph as
        # sym_shape_infer_temp.onnx + <uuid>.data in the working directory: keep both inside ``directory``
        with contextlib.redirect_stdout(io.StringIO()), _working_directory(directory):
            quant_pre_process(onnx.load_from_string(onnx_bytes), str(path))
    except Exception:  # noqa: BLE001 - ORT's symbolic shape inference gives up on some dynamic sequence axes
        # (e.g. "Min(256, sequence)" from a transformer's position ids); ONNX's own shape inference still runs
        quant_pre_process(onnx.load_from_string(onnx_bytes), str(path), skip_symbolic_shape=True)
    return onnx.load(str(path))


def _float_tensors(model: Any) -> dict[str, None]:
    """Names of float32 activations with known types (graph input first, then node outputs), ordered."""
    onnx = require_onnx()
    infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    initializers = {init.name for init in model.graph.initializer}
    names: dict[str, None] = {}
    for name in [*(i.name for i in model.graph.input), *(o for n in model.graph.node for o in n.output)]:
        info = infos.get(name)
        if name in initializers or info is None or not info.type.HasField("tensor_type"):
            continue
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names[name] = None
    return names


@dataclasses.dataclass(frozen=True)
class _Range:
    """One activation's calibrated range: ``(lo, hi)`` for an asymmetric quantizer, ``bound`` for a symmetric one
    (``(-bound, bound)``; from the observer's symmetric statistics, e.g. a percentile of ``|x|``)."""

    lo: float
    hi: float
    bound: float

    @property
    def lopsided(self) -> bool:
        """A symmetric int8 grid would be >= 1.5x coarser than an asymmetric uint8 one (ReLU, GELU, Softmax)."""
        return self.hi > self.lo and 2 * self.bound >= _LOPSIDED * (self.hi - self.lo)


_LOPSIDED = 1.5


def _observe_ranges(model: Any, inputs: Tensor, config: StaticInt8) -> dict[str, _Range]:
    """Run the fp32 graph with every float activation exposed; return each one's observed range."""
    names = list(_float_tensors(model))
    observers = {
        name: create_observer(
            config.observer, symmetric=config.symmetric_activations, percentile=config.percentile
        )
        for name in names
    }
    step = 1 if config.observer == "mean-minmax" else _CALIBRATION_BATCH  # it averages per-sample extremes
    for values in exposed_values(model, names, inputs, step):
        for name, value in values.items():
            observers[name].update(value)
    ranges = {name: _range_of(observer) for name, observer in observers.items() if observer.count}
    # ORT gives a Relu/Clip's input the range of its output (the activation is folded into the
    # quantizer); do the same so our overrides agree with the graph ORT builds.
    consumers = collections.Counter(i for node in model.graph.node for i in node.input)
    for node in model.graph.node:
        if node.op_type in ("Relu", "Clip") and consumers[node.input[0]] == 1:
            if node.input[0] in ranges and node.output[0] in ranges:
                ranges[node.input[0]] = ranges[node.output[0]]
    return ranges


def _range_of(observer: Any) -> _Range:
    """Both ranges from one observer's statistics (its ``symmetric`` flag only shapes the final range)."""
    symmetric = observer.symmetric
    try:
        observer.symmetric = False
        lo, hi = observer.compute_range()
        observer.symmetric = True
        bound = observer.compute_range()[1]
    finally:
        observer.symmetric = symmetric
    return _Range(lo, hi, bound)


def _activation_overrides(model: Any, ranges: dict[str, _Range], config: StaticInt8) -> dict[str, list[dict]]:
    """ONNX Runtime's ``TensorQuantOverrides``: each activation's range and, where it differs from the default
    activation type, its type.

    - symmetric activations (int8, zero point 0): a lopsided tensor (:attr:`_Range.lopsided`: ReLU, GELU and
      Softmax outputs) is uint8 over its asymmetric range instead, as half of a symmetric grid would go unused
      (a BERT-shaped encoder by OpenVINO: cosine 0.999959 -> 0.999974 at the same speed; NNCF 0.999965);
    - asymmetric activations (uint8): the second input of a MatMul of two activations is symmetric int8, because
      int8 matrix kernels (oneDNN's, which OpenVINO runs; MLAS's) multiply uint8 by int8 and a uint8 x uint8
      product takes a slower path.
    """
    from onnxruntime.quantization import QuantType

    known = _float_tensors(model)
    right = set(_activation_matmul_right_inputs(model))
    overrides = {}
    for tensor, r in ranges.items():
        if tensor not in known:
            continue
        if config.symmetric_activations and r.lopsided and tensor not in right:
            override = {"quant_type": QuantType.QUInt8, "symmetric": False, "rmin": r.lo, "rmax": r.hi}
        elif not config.symmetric_activations and tensor in right:
            override = {"quant_type": QuantType.QInt8, "symmetric": True, "rmin": -r.bound, "rmax": r.bound}
        elif config.symmetric_activations:
            override = {"rmin": -r.bound, "rmax": r.bound}
        else:
            override = {"rmin": r.lo, "rmax": r.hi}
        override["rmin"], override["rmax"] = np.float32(override["rmin"]), np.float32(override["rmax"])
        overrides[tensor] = [override]
    return overrides


def _activation_matmuls(model: Any) -> list[Any]:
    """MatMul nodes whose both inputs are activations (attention's ``Q @ K^T`` and ``P @ V``)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node for node in model.graph.node if node.op_type == "MatMul" and not (set(node.input[:2]) & constants)]


def _activation_matmul_right_inputs(model: Any) -> list[str]:
    """The second inputs of :func:`_activation_matmuls`."""
    return [node.input[1] for node in _activation_matmuls(model)]


def _probability_products(model: Any) -> list[str]:
    """Names of the activation MatMuls whose left input is a Softmax output (attention's ``P @ V``).

    ``ops="matmul"`` leaves them float, as NNCF's transformer preset does: the probabilities' int8 grid is coarse
    where they matter (a BERT-shaped encoder by OpenVINO, SmoothQuant 0.8: cosine 0.9999779 -> 0.9999783).
    """
    softmax = {out for node in model.graph.node if node.op_type == "Softmax" for out in node.output}
    return [node.name for node in _activation_matmuls(model) if node.name and node.input[0] in softmax]


def _reader(inputs: Tensor, input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                {input_name: inputs[start : start + _CALIBRATION_BATCH].numpy()}
                for start in range(0, inputs.shape[0], _CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return _Batches()


def unquantized_nodes(onnx_bytes: bytes) -> dict[str, str]:
    """Conv/Gemm/MatMul nodes of a quantized graph that still compute in float, with the reason.

    Args:
        onnx_bytes: a graph written by ORT's static (QDQ) or dynamic quantizer.

    Returns:
        Node name (or op type and index) -> reason.
    """
    onnx = require_onnx()
    model = onnx.load_from_string(bytes(onnx_bytes))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    constants = {init.name for init in model.graph.initializer}
    skipped = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _WEIGHT_OPS:
            continue
        inputs = [producers.get(name) for name in node.input[:2]]
        if all(op == "DequantizeLinear" for op in inputs):
            continue
        label = node.name or f"{node.op_type}_{index}"
        if node.op_type == "Conv" and any(n.op_type == "MatMulInteger" for n in model.graph.node):
            skipped[label] = "Conv stays fp32: dynamic int8 quantizes Linear (MatMul/Gemm) layers only"
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] not in constants:
            skipped[label] = f"{node.op_type} without a constant weight is not quantized"
        else:
            skipped[label] = f"{node.op_type} was left in fp32 by ONNX Runtime's quantizer"
    return skipped


# --- public API ---------------------------------------------------------------------------------
def quantize_static(
    model: nn.Module,
    calibration_data: Any,
    config: StaticInt8 | None = None,
    *,
    example_inputs: Tensor | None = None,
    min_agreement: float = STATIC_MIN_AGREEMENT,
) -> OnnxGraph:
    """Static int8 (W8A8) post-training quantization executed by ONNX Runtime (QDQ, int8 kernels).

    The model is exported to fp32 ONNX, activation ranges are calibrated with ``config.observer`` on
    the first ``config.calibration_samples`` samples, and ORT's quantizer writes a QDQ graph (int8
    weights, uint8 activations, or int8 with ``symmetric_activations``). The int8 graph must agree
    with the fp32 model on the top-1 class of at least ``min_agreement`` of the calibration
    samples. The model itself is not changed.

    Args:
        model: a single-input fp32 model (e.g. a classifier).
        calibration_data: Tensor, Dataset, DataLoader or DataSplits (its ``train`` split).
        config: a :class:`StaticInt8` (default ``StaticInt8()``).
        example_inputs: input batch for the export (default: the first calibration sample).
        min_agreement: smallest allowed top-1 agreement with the fp32 model on the calibration samples
            (in [0, 1]; lower it for models whose logits are near-ties, e.g. random weights).

    Returns:
        An :class:`OnnxGraph` holding the int8 graph (``graph.parity``, ``graph.skipped`` describe it).

    Raises:
        ConfigError: ``config`` is not a StaticInt8, or ``min_agreement`` is outside [0, 1].
        DataError: empty or unsupported calibration data, or bad ``example_inputs`` (before any work).
        MissingDependencyError: onnxruntime or onnx is not installed.
        ModelError: the model cannot be exported.
        TorchSlimError: the int8 graph disagrees with the fp32 model (the message gives the numbers).
    """
    config = StaticInt8() if config is None else config
    if not isinstance(config, StaticInt8):
        raise ConfigError(f"config = {type(config).__name__} is invalid: expected StaticInt8")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 <= min_agreement <= 1:
        raise ConfigError(f"min_agreement = {min_agreement!r} is invalid: expected a number in [0, 1]")
    inputs = calibration_inputs(calibration_data, config.calibration_samples)
    example = inputs[:1] if example_inputs is None else _example(example_inputs)
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    fp32 = export_onnx(model, example)
    with tempfile.TemporaryDirectory(prefix="torchslim-int8-") as name:
        directory = Path(name)
        prepared = _preprocess(fp32, directory)
        if config.smooth_quant is not None:
            smooth_graph(prepared, inputs, config.smooth_quant, _CALIBRATION_BATCH)
        overrides = _activation_overrides(prepared, _observe_ranges(prepared, inputs, config), config)
        output = directory / "int8.onnx"
        ort_quantize_static(
            prepared, str(output), _reader(inputs, prepared.graph.input[0].name),
            quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=config.reduce_range,
            op_types_to_quantize=STATIC_OPS[config.ops],
            nodes_to_exclude=_probability_products(prepared) if config.ops == "matmul" else None,
            activation_type=QuantType.QInt8 if config.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": config.symmetric_activations, "WeightSymmetric": True,
                           "TensorQuantOverrides": overrides},
        )
        proto = require_onnx().load(str(output))
        _float_graph_outputs(proto)
        if STATIC_OPS[config.ops] is not None:
            _float_consumers_read_float(proto, STATIC_OPS[config.ops])
        int8 = proto.SerializeToString()
    graph = OnnxGraph.from_bytes(int8, source_factory=factory_of(model), quantization=config.to_dict())
    try:
        graph.parity = check_parity(model, int8, inputs, atol=None, min_agreement=min_agreement)
    except TorchSlimError as exc:
        raise TorchSlimError(
            f"static int8 ({config.observer} observer): the int8 graph is too far from the fp32 model: "
            f"{exc}; try observer='percentile' or 'mse', or more calibration data"
        ) from exc
    graph.skipped = unquantized_nodes(int8)
    return graph


def _float_graph_outputs(proto: Any) -> list[str]:
    """Let the graph's outputs keep the float values their producers compute.

    ORT's QDQ quantizer rounds a quantized op's output to int8 even when it is the graph's output: a ResNet-18's
    logits went through a QuantizeLinear/DequantizeLinear pair (cosine to fp32 0.99995 by OpenVINO; 0.99997 without
    the pair, NNCF's placement). The producer now writes the output directly and the pair is dropped.

    Args:
        proto: the QDQ ``onnx.ModelProto`` (changed in place).

    Returns:
        The names of the outputs that were un-rounded.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    readers = collections.Counter(name for node in proto.graph.node for name in node.input)
    freed = []
    for output in proto.graph.output:
        dequantize = producer.get(output.name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(dequantize.input[0])
        source = None if quantize is None or quantize.op_type != "QuantizeLinear" else producer.get(quantize.input[0])
        if source is None or readers[quantize.input[0]] != 1 or readers[dequantize.input[0]] != 1:
            continue  # the float tensor (or its int8 copy) is read elsewhere too: leave the pair
        source.output[list(source.output).index(quantize.input[0])] = output.name
        proto.graph.node.remove(dequantize)
        proto.graph.node.remove(quantize)
        freed.append(output.name)
    return freed


def _float_consumers_read_float(proto: Any, quantized_ops: list[str]) -> int:
    """Rewire float consumers of quantized activations to the float tensor, and drop the pairs left unused.

    ORT's QDQ quantizer puts one QuantizeLinear/DequantizeLinear pair on a quantized op's activation input and hands
    the rounded tensor to *every* consumer: in a post-norm transformer the residual Add reads the int8-rounded
    LayerNorm output, so the residual stream is rounded at every layer (a BERT-shaped encoder: cosine 0.9994 to fp32
    instead of 0.9999 with only the MatMul inputs rounded, as NNCF places them). Ops in ``quantized_ops`` keep the
    rounded tensor.

    Args:
        proto: the QDQ ``onnx.ModelProto`` (changed in place).
        quantized_ops: op types that run in int8.

    Returns:
        How many node inputs were rewired.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    rewired = 0
    for node in proto.graph.node:
        if node.op_type in quantized_ops or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producer.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":  # not a weight's DQ of an initializer
                node.input[index] = quantize.input[0]
                rewired += 1
    while True:  # drop DQ, then Q nodes nobody reads any more
        used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
        dead = [node for node in proto.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in used for out in node.output)]
        if not dead:
            return rewired
        for node in dead:
            proto.graph.node.remove(node)


def quantize_to_graph(model: nn.Module, config: StaticInt8 | DynamicInt8, data: Any) -> OnnxGraph:
    """The ONNX Runtime int8 graph of ``model`` for a config that ``produces_graph``.

    Args:
        model: the fp32 model.
        config: :class:`StaticInt8` (calibrated on ``data``'s training split) or :class:`DynamicInt8`.
        data: ``DataSplits`` (``train`` and ``example_inputs``).

    Returns:
        The :class:`OnnxGraph`.

    Raises:
        ConfigError: another config type.
    """
    if isinstance(config, StaticInt8):
        return quantize_static(model, data.train, config, example_inputs=data.example_inputs(1))
    if isinstance(config, DynamicInt8):
        return quantize_dynamic(model, config, example_inputs=data.example_inputs(32))
    raise ConfigError(f"config = {type(config).__name__} is invalid for quantize_to_graph: expected StaticInt8 or "
                      "DynamicInt8")


def quantize_dynamic(
    model: nn.Module,
    config: DynamicInt8 | None = None,
    *,
    example_inputs: Tensor,
) -> OnnxGraph:
    """Dynamic int8 quantization of the Linear layers, executed by ONNX Runtime (``MatMulInteger``).

    Weights are stored in int8; activations are quantized per batch at run time. Convolutions stay
    fp32 (listed in ``graph.skipped``). The model itself is not changed.

    Args:
        model: an fp32 model with at least one Linear layer.
        config: a :class:`DynamicInt8` (default ``DynamicInt8()``).
        example_inputs: input batch for the export (and the parity check in ``graph.parity``): a tensor, or a
            tuple of tensors for a model with several inputs (e.g. token ids and an attention mask).

    Returns:
        An :class:`OnnxGraph` holding the int8 graph.

    Raises:
        ConfigError: ``config`` is not a DynamicInt8.
        DataError: bad ``example_inputs``.
        MissingDependencyError: onnxruntime or onnx is not installed.
        ModelError: the model cannot be exported or has no Linear layer to quantize.
        TorchSlimError: the int8 graph returns NaN or infinite values.
    """
    config = DynamicInt8() if config is None else config
    if not isinstance(config, DynamicInt8):
        raise ConfigError(f"config = {type(config).__name__} is invalid: expected DynamicInt8")
    example = _example_tuple(example_inputs)
    require_onnxruntime()
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    fp32 = export_onnx(model, example)
    with tempfile.TemporaryDirectory(prefix="torchslim-int8-") as name:
        directory = Path(name)
        prepared = _preprocess(fp32, directory)
        output = directory / "int8.onnx"
        ort_quantize_dynamic(
            prepared, str(output), op_types_to_quantize=["MatMul"], per_channel=config.per_channel,
            reduce_range=config.reduce_range, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
        )
        int8 = output.read_bytes()
    onnx = require_onnx()
    if not any(node.op_type == "MatMulInteger" for node in onnx.load_from_string(int8).graph.node):
        raise ModelError(
            f"{type(model).__name__} has no Linear layer (MatMul/Gemm with a constant weight) to quantize "
            "dynamically: use quantize_static for convolutional models"
        )
    graph = OnnxGraph.from_bytes(int8, source_factory=factory_of(model), quantization=config.to_dict())
    graph.parity = check_parity(model, int8, example, atol=float("inf"), min_agreement=0.0)
    graph.skipped = unquantized_nodes(int8)
    return graph

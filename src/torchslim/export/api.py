"""``export``: a model (or a loaded ``.slim``) to a deployable ONNX graph, checked against PyTorch on every call.

Modes (``ExportConfig.quant``):

- ``"none"``: the fp32 graph (``precision="fp16"`` stores weights and computes in fp16, inputs/outputs stay fp32);
- ``"int8-static"``: QDQ int8 weights (per output channel) and activations calibrated on ``calib_data``
  (:func:`torchslim.quantize.int8.quantize_static`); ORT runs ``QLinearConv``/``QGemm``;
- ``"int8-dynamic"``: int8 Linear weights, activations quantized per batch (``DynamicQuantizeLinear`` +
  ``MatMulInteger``), convolutions fp32;
- ``"int4-weight"``: 4-bit weight-only Linear layers as ``MatMulNBits`` (:mod:`torchslim.export.int4`); packed
  4-bit torchslim layers keep their own codes and scales, other Linear layers are quantized by ORT; convolutions
  stay fp32.

Packed torchslim layers (``IntQuantLayer``, ``CodebookLayer``, ``HalfLayer``) are exported through fp32 copies that
hold exactly their dequantized weights, so the fp32/int8 graphs compute what the packed model computes (int8 modes
then quantize those values again to 8 bits). Structurally pruned models are already smaller dense models and export
as such. An :class:`~torchslim.models.onnx_graph.OnnxGraph` (an int8 ``.slim``) is written as stored.

``transformer_fusion=True`` first runs ONNX Runtime's transformer optimizer (attention, SkipLayerNorm, BiasGelu
fusion; ``onnxruntime.transformers.optimizer``, model type ``bert``) on the fp32 graph; dynamic int8 then also
quantizes the fused ``Attention`` weights (``QAttention``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, MissingDependencyError, TorchSlimError
from torchslim.export.int4 import (
    dequantized_copy,
    gemm_to_matmul,
    matmulnbits_reason,
    ort_weight_only,
    pack_matmulnbits,
)
from torchslim.fileio import atomic_write_bytes
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.onload import materialize_
from torchslim.onnx.convert import DEFAULT_OPSET, check_parity, export_onnx
from torchslim.onnx.runtime import graph_op_types, require_onnx, require_onnxruntime
from torchslim.quantize.int8 import (
    STATIC_MIN_AGREEMENT,
    STATIC_OPS,
    StaticInt8,
    calibration_inputs,
    quantize_static,
    unquantized_nodes,
)
from torchslim.quantize.observers import OBSERVERS

__all__ = [
    "FP32_ATOL",
    "FP32_RTOL",
    "PARITY_LIMITS",
    "QUANT_MODES",
    "ExportConfig",
    "ExportReport",
    "choose_opset",
    "export",
]

QUANT_MODES = ("none", "int8-static", "int8-dynamic", "int4-weight")
PRECISIONS = ("fp32", "fp16")
# (min cosine, min top-1 agreement) of the exported graph vs the PyTorch model, per mode
PARITY_LIMITS = {"fp32": (0.9999, 0.99), "fp16": (0.999, 0.95), "int8": (0.98, 0.9), "int4": (0.95, 0.8)}
FP32_ATOL, FP32_RTOL = 1e-4, 1e-3
_PARITY_SAMPLES = 64
# newest ai.onnx opset each ONNX Runtime minor release runs (from ORT's compatibility table)
_ORT_MAX_OPSET = (
    (1, 10, 15),
    (1, 11, 16),
    (1, 12, 17),
    (1, 14, 18),
    (1, 15, 19),
    (1, 17, 20),
    (1, 18, 21),
    (1, 20, 21),
    (1, 21, 22),
    (1, 22, 23),
)
_MIN_ORT_FOR_NBITS = (1, 17)


@register_config("export")
@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """How :func:`export` writes the graph.

    Args:
        quant: one of ``QUANT_MODES``.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 only with ``quant="none"``).
        opset: ai.onnx opset in [13, 21]; None picks :func:`choose_opset` for the installed ONNX Runtime.
        dynamic_batch: the batch axis of inputs and outputs is dynamic.
        block_size: int4-weight block (inputs per scale) for Linear layers ORT quantizes; a power of two >= 16.
        symmetric: int4-weight: zero point fixed at 8 for layers ORT quantizes.
        accuracy_level: ``MatMulNBits`` compute: 0 (unset), 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPU).
        observer: int8-static activation observer (``minmax``, ``mean-minmax``, ``percentile``, ``mse``).
        calibration_samples: int8-static calibration samples (>= 1).
        static_ops: int8-static: ``"all"`` (every node ONNX Runtime's quantizer takes) or ``"matmul"``
            (MatMul/Gemm only; see :class:`~torchslim.quantize.int8.StaticInt8`).
        symmetric_activations: int8-static: as :class:`~torchslim.quantize.int8.StaticInt8`'s (zero point 0 but
            uint8 for lopsided tensors; else asymmetric uint8).
        smooth_quant: int8-static: SmoothQuant's alpha in (0, 1], or None (off); see
            :class:`~torchslim.quantize.int8.StaticInt8`.
        reduce_range: int8 modes: weights rounded to 7 bits, for x86 CPUs without VNNI (see
            :class:`~torchslim.quantize.int8.DynamicInt8`); False keeps all 8 bits, closer to fp32 where the graph
            runs on a CPU with VNNI/AMX or on ARM (:func:`torchslim.deploy` chooses by the CPU it runs on).
        transformer_fusion: run ORT's transformer fusion (attention, LayerNorm, GELU) before quantizing.
        min_cosine: smallest allowed cosine similarity of the outputs vs PyTorch; None: the mode's default
            (fp32 0.9999, fp16 0.999, int8 0.98, int4 0.95).
        min_agreement: smallest allowed top-1 agreement; None: the mode's default (0.99, 0.95, 0.9, 0.8).
    """

    quant: str = "none"
    precision: str = "fp32"
    opset: int | None = None
    dynamic_batch: bool = True
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    observer: str = "minmax"
    calibration_samples: int = 256
    static_ops: str = "all"
    symmetric_activations: bool = False
    smooth_quant: float | None = None
    reduce_range: bool = True
    transformer_fusion: bool = False
    min_cosine: float | None = None
    min_agreement: float | None = None

    def validate(self) -> None:
        self.check_choice("quant", QUANT_MODES)
        self.check_choice("precision", PRECISIONS)
        if self.precision == "fp16" and self.quant != "none":
            raise self.fail("precision", self.precision, "'fp32' with quant = " + repr(self.quant))
        if self.opset is not None:
            self.check_int("opset", 13, 21)
        for flag in ("dynamic_batch", "symmetric", "symmetric_activations", "reduce_range", "transformer_fusion"):
            if not isinstance(getattr(self, flag), bool):
                raise self.fail(flag, getattr(self, flag), "True or False")
        self.check_int("block_size", 16)
        if self.block_size & (self.block_size - 1):
            raise self.fail("block_size", self.block_size, "a power of two >= 16")
        self.check_int("accuracy_level", 0, 4)
        self.check_choice("observer", OBSERVERS)
        self.check_int("calibration_samples", 1)
        self.check_choice("static_ops", tuple(STATIC_OPS))
        if self.smooth_quant is not None:
            self.check_float("smooth_quant", 0, 1, lo_inclusive=False)
        static_only = {"static_ops": "all", "symmetric_activations": False, "smooth_quant": None}
        changed = [field for field, default in static_only.items() if getattr(self, field) != default]
        if self.quant != "int8-static" and changed:
            field = changed[0]
            raise self.fail(field, getattr(self, field), f"its default with quant = {self.quant!r} (int8-static only)")
        if not self.reduce_range and self.family != "int8":
            raise self.fail("reduce_range", False, f"its default (True) with quant = {self.quant!r} (int8 modes only)")
        if self.transformer_fusion and self.quant == "int8-static":
            raise self.fail("transformer_fusion", True, "False with quant = 'int8-static'")
        if self.min_cosine is not None:
            self.check_float("min_cosine", -1.0, 1.0)
        if self.min_agreement is not None:
            self.check_float("min_agreement", 0.0, 1.0)

    @property
    def family(self) -> str:
        """``fp32``, ``fp16``, ``int8`` or ``int4``: the tolerance class of the mode."""
        if self.quant == "none":
            return self.precision
        return "int4" if self.quant == "int4-weight" else "int8"


@dataclasses.dataclass
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        path: the file written (None when only bytes were asked for).
        bytes: size of the graph in bytes.
        op_types: node types of the graph as stored (``QuantizeLinear``, ``MatMulNBits`` ...).
        quant: the quantization mode; precision: ``fp32``/``fp16``; opset: the ai.onnx opset.
        parity: ``max_abs_error``, ``top1_agreement``, ``cosine``, ``samples`` (ORT vs the PyTorch model).
        packed_layers: torchslim 4-bit layers written as ``MatMulNBits`` from their own codes and scales.
        notes: what was left in higher precision or re-quantized, and why.
        config: the :class:`ExportConfig` as a dict.
        graph: the serialised graph (not in ``to_dict``).
    """

    path: str | None
    bytes: int
    op_types: collections.Counter
    quant: str
    precision: str
    opset: int
    parity: dict[str, float]
    packed_layers: list[str]
    notes: list[str]
    config: dict[str, Any]
    graph: bytes = dataclasses.field(repr=False, default=b"")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (without the graph bytes)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "graph"}
        data["op_types"] = dict(sorted(self.op_types.items()))
        return data


def choose_opset(preferred: int = DEFAULT_OPSET) -> int:
    """The opset to export with: ``preferred``, capped at the newest the installed ONNX Runtime runs.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
    """
    version = _ort_version()
    newest = 14
    for major, minor, opset in _ORT_MAX_OPSET:
        if version >= (major, minor):
            newest = opset
    return min(preferred, newest)


def _ort_version() -> tuple[int, int]:
    ort = require_onnxruntime()
    parts = [int(p) if p.isdigit() else 0 for p in ort.__version__.split(".")[:2]]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def _inputs(value: Any, what: str) -> Tensor | tuple[Tensor, ...]:
    """A float32 batch, or a tuple of batches for a model with several inputs (token ids and masks keep their
    integer dtype)."""
    if isinstance(value, (tuple, list)) and value:
        return tuple(_one_input(item, what) for item in value)
    return _one_input(value, what)


def _one_input(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] == 0:
        raise DataError(f"{what} = {type(value).__name__} is invalid: expected a tensor with a leading batch "
                        "dimension, or a tuple of them (e.g. token ids and an attention mask)")
    value = value.detach().to("cpu")
    return value.to(torch.float32) if value.is_floating_point() else value


def export(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    config: ExportConfig | None = None,
    *,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    calib_data: Any = None,
    parity_inputs: Tensor | tuple[Tensor, ...] | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX (optionally quantized), check it against PyTorch in ONNX Runtime, write it.

    Args:
        model: the model (a single-input model; fp32, packed torchslim layers, structurally pruned, or an
            ``OnnxGraph``). It is not changed.
        path: where to write the ``.onnx`` (atomically); None only returns the bytes in ``report.graph``.
        config: an :class:`ExportConfig` (default: fp32).
        example_inputs: an input batch for the export (a tuple of batches for a model with several inputs, e.g.
            ``(input_ids, attention_mask)``); default: the first calibration sample.
        calib_data: calibration data for ``int8-static`` (Tensor, Dataset, DataLoader or DataSplits).
        parity_inputs: inputs of the parity check; default: up to 64 calibration samples, else
            ``example_inputs``.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ConfigError: a bad config, or ``int8-static`` without ``calib_data`` (before any work).
        DataError: no example inputs, or bad inputs.
        MissingDependencyError: onnx/onnxruntime missing, or too old for ``MatMulNBits``.
        ModelError: the model cannot be exported.
        TorchSlimError: the graph disagrees with the model beyond the mode's tolerance (the message has the
            numbers); nothing is written then.
    """
    config = ExportConfig() if config is None else config
    if not isinstance(config, ExportConfig):
        raise ConfigError(f"config = {type(config).__name__} is invalid: expected ExportConfig")
    if config.quant == "int8-static" and calib_data is None:
        raise ConfigError("quant = 'int8-static' needs calib_data: expected calibration inputs (e.g. DataSplits)")
    if config.quant == "int8-static" and isinstance(example_inputs, (tuple, list)):
        raise ConfigError("quant = 'int8-static' is invalid for a model with several inputs (e.g. token ids and a "
                          "mask): expected quant = 'int8-dynamic' or 'int4-weight'")
    calib = None
    if calib_data is not None:
        calib = calibration_inputs(calib_data, max(config.calibration_samples, _PARITY_SAMPLES))
    if example_inputs is None and calib is None:
        raise DataError("example_inputs is missing: expected an input batch (or calib_data to take one from)")
    example = _inputs(example_inputs, "example_inputs") if example_inputs is not None else calib[:1]
    check = (
        _inputs(parity_inputs, "parity_inputs")
        if parity_inputs is not None
        else (calib[:_PARITY_SAMPLES] if calib is not None else example)
    )
    require_onnx()
    materialize_(model)  # a lazily loaded model's blocks still in their file
    opset = config.opset if config.opset is not None else choose_opset()
    notes: list[str] = []
    packed_layers: list[str] = []
    if isinstance(model, OnnxGraph):
        if config.quant != "none" or config.precision != "fp32":
            raise ConfigError(
                f"quant = {config.quant!r}, precision = {config.precision!r} is invalid for an OnnxGraph model (its "
                f"graph is already quantized: {(model.quantization or {}).get('type', 'none')}): expected quant = "
                "'none', precision = 'fp32' (the graph is written as stored)"
            )
        data = model.onnx_bytes()
        notes.append("OnnxGraph: the stored graph is written unchanged")
    else:
        data, packed_layers = _build(model, config, example, calib, opset, notes)
    limits = PARITY_LIMITS[config.family]
    min_cosine = limits[0] if config.min_cosine is None else config.min_cosine
    min_agreement = limits[1] if config.min_agreement is None else config.min_agreement
    exact = config.family == "fp32"
    try:
        parity = check_parity(
            model,
            data,
            check,
            atol=FP32_ATOL if exact else None,
            rtol=FP32_RTOL if exact else 0.0,
            min_agreement=min_agreement,
            min_cosine=min_cosine,
        )
    except TorchSlimError as exc:
        raise TorchSlimError(f"export ({config.quant}, {config.precision}): {exc}") from exc
    if path is not None:
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise TorchSlimError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    return ExportReport(
        path=None if path is None else str(path),
        bytes=len(data),
        op_types=graph_op_types(data),
        quant=config.quant,
        precision=config.precision,
        opset=opset,
        parity=parity,
        packed_layers=packed_layers,
        notes=notes,
        config=config.to_dict(),
        graph=data,
    )


def _build(model, config: ExportConfig, example: Tensor, calib: Tensor | None, opset: int, notes: list[str]):
    """The graph bytes for a PyTorch model; returns ``(bytes, packed layer names)``."""
    plain, packed = dequantized_copy(model)
    if packed and config.quant != "int4-weight":
        notes.append(f"{len(packed)} packed IntQuantLayer(s) exported with their dequantized weights")
    if config.quant == "int8-static" and not config.transformer_fusion:
        static = StaticInt8(observer=config.observer, calibration_samples=config.calibration_samples,
                            ops=config.static_ops, symmetric_activations=config.symmetric_activations,
                            reduce_range=config.reduce_range, smooth_quant=config.smooth_quant)
        agreement = STATIC_MIN_AGREEMENT if config.min_agreement is None else config.min_agreement
        graph = quantize_static(plain, calib, static, example_inputs=example, min_agreement=agreement)
        notes.extend(f"{name}: {reason}" for name, reason in graph.skipped.items())
        return graph.onnx_bytes(), []
    onnx = require_onnx()
    fp32 = export_onnx(plain, example, opset=opset, dynamic_batch=config.dynamic_batch)
    proto = onnx.load_from_string(fp32)
    if config.transformer_fusion:
        proto = _fuse_transformer(proto, notes)
    if config.quant == "none":
        if config.precision == "fp16":
            proto = _to_fp16(proto)
        return proto.SerializeToString(), []
    if config.quant == "int8-dynamic":
        return _dynamic_int8(proto, notes, config.reduce_range), []
    return _int4(proto, packed, config, notes, matmulnbits_reason)


def _fuse_transformer(proto: Any, notes: list[str]) -> Any:
    from onnxruntime.transformers.optimizer import optimize_model

    optimizer = optimize_model(proto, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    fused = {op: n for op, n in optimizer.get_fused_operator_statistics().items() if n}
    summary = ", ".join(f"{op} x{n}" for op, n in sorted(fused.items()))
    notes.append(f"transformer fusion: {summary or 'nothing fused'}")
    model = optimizer.model
    if fused and not any(op.domain == "com.microsoft" for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _to_fp16(proto: Any) -> Any:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)


@contextlib.contextmanager
def _root_warnings_off() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _dynamic_int8(proto: Any, notes: list[str], reduce_range: bool) -> bytes:
    onnx = require_onnx()
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="torchslim-export-") as name:
        source, output = Path(name) / "fp32.onnx", Path(name) / "int8.onnx"
        onnx.save(proto, str(source))
        with _root_warnings_off():  # ORT logs a pre-processing hint on the root logger
            ort_quantize_dynamic(
                str(source),
                str(output),
                op_types_to_quantize=["MatMul", "Attention"],
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        data = output.read_bytes()
    ops = graph_op_types(data)
    if not (ops["MatMulInteger"] or ops["QAttention"] or ops["DynamicQuantizeMatMul"]):
        raise TorchSlimError(
            "int8-dynamic: the graph has no Linear layer (MatMul/Gemm with a constant weight) to quantize: use "
            "int8-static for convolutional models"
        )
    notes.extend(f"{node}: {reason}" for node, reason in unquantized_nodes(data).items())
    return data


def _int4(proto: Any, packed: dict, config: ExportConfig, notes: list[str], reason_of) -> tuple[bytes, list[str]]:
    if _ort_version() < _MIN_ORT_FOR_NBITS:
        raise MissingDependencyError("int4-weight needs onnxruntime >= 1.17 (MatMulNBits): pip install -U onnxruntime")
    gemm_to_matmul(proto)
    eligible = {}
    for name, layer in packed.items():
        reason = reason_of(layer)
        if reason is None:
            eligible[name] = layer
        elif layer.op == "linear":  # convolutions are reported once, below
            notes.append(f"{name}: {reason}")
    done = pack_matmulnbits(proto, eligible, accuracy_level=config.accuracy_level)
    for name in sorted(set(eligible) - set(done)):
        notes.append(f"{name}: not found as a MatMul in the graph (fused or folded); re-quantized by ORT")
    proto = ort_weight_only(
        proto, block_size=config.block_size, symmetric=config.symmetric, accuracy_level=config.accuracy_level
    )
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    if not ops["MatMulNBits"]:
        raise TorchSlimError(
            "int4-weight: the graph has no Linear layer (MatMul/Gemm with a constant weight) to quantize; "
            "convolutions stay fp32 with MatMulNBits: use int8-static for convolutional models"
        )
    convs = ops["Conv"] + ops["FusedConv"]
    if convs:
        notes.append(f"{convs} Conv node(s) stay fp32: MatMulNBits covers MatMul/Gemm only")
    if ops["Attention"]:
        notes.append(f"{ops['Attention']} fused Attention node(s) keep fp32 q/k/v weights")
    return proto.SerializeToString(), done

"""Quantization: the seed's affine formula, packed k-bit weights, codebooks, half precision."""

from torchslim.quantize.api import (
    CodebookQuant,
    HalfPrecision,
    IntQuant,
    QuantizeReport,
    quantization_handler,
    quantize_,
)
from torchslim.quantize.awq import AWQ, awq_
from torchslim.quantize.gptq import GPTQ, gptq_
from torchslim.quantize.int8 import DynamicInt8, StaticInt8, quantize_dynamic, quantize_static, quantize_to_graph
from torchslim.quantize.layers import CodebookLayer, HalfLayer, IntQuantLayer
from torchslim.quantize.qat import QATLayer, convert_, prepare_qat_
from torchslim.quantize.sensitivity import LayerSensitivity, sensitivity
from torchslim.quantize.sweep import SweepRow, sweep_bits

__all__ = [
    "QATLayer",
    "convert_",
    "prepare_qat_",
    "DynamicInt8",
    "LayerSensitivity",
    "StaticInt8",
    "SweepRow",
    "quantize_dynamic",
    "quantize_static",
    "quantize_to_graph",
    "AWQ",
    "awq_",
    "GPTQ",
    "gptq_",
    "sensitivity",
    "sweep_bits",
    "CodebookLayer",
    "CodebookQuant",
    "HalfLayer",
    "HalfPrecision",
    "IntQuant",
    "IntQuantLayer",
    "QuantizeReport",
    "quantization_handler",
    "quantize_",
]

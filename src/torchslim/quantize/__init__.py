"""Quantization: the seed's affine formula, packed k-bit weights, codebooks, half precision."""

from torchslim.quantize.api import (
    CodebookQuant,
    HalfPrecision,
    IntQuant,
    QuantizeReport,
    quantization_handler,
    quantize_,
)
from torchslim.quantize.layers import CodebookLayer, HalfLayer, IntQuantLayer

__all__ = [
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

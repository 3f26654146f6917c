"""Measure a model honestly: bytes on disk, parameters, MACs, accuracy, fidelity, latency, memory.

``import torchslim.measure`` is itself callable as :func:`measure`, so ``ts.measure(model, data)``
works in every import order.
"""

from __future__ import annotations

from torchslim._callable_module import make_module_callable
from torchslim.measure.accuracy import accuracy, fidelity
from torchslim.measure.api import Measurement, format_measurement, measure
from torchslim.measure.latency import measure_latency
from torchslim.measure.macs import count_macs
from torchslim.measure.memory import peak_memory_bytes
from torchslim.measure.size import artifact_bytes, parameter_stats

__all__ = [
    "Measurement",
    "accuracy",
    "artifact_bytes",
    "count_macs",
    "fidelity",
    "format_measurement",
    "measure",
    "measure_latency",
    "parameter_stats",
    "peak_memory_bytes",
]

make_module_callable(__name__, "measure")

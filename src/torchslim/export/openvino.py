"""Run an ONNX graph in OpenVINO's CPU runtime (optional dependency ``openvino``, imported lazily).

OpenVINO reads ONNX directly, QDQ int8 graphs included (it runs their int8 convolutions and matmuls natively), so
the artifact stays the ``.onnx`` file that :func:`torchslim.export` writes; :class:`OpenVinoGraph` compiles it once
per input shape (static shapes compile to faster code than a dynamic batch axis) with ``PERFORMANCE_HINT=LATENCY``
and the given number of threads.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchslim.errors import MissingDependencyError

__all__ = ["OpenVinoGraph", "openvino_available", "require_openvino"]


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (nothing is imported)."""
    return importlib.util.find_spec("openvino") is not None


def require_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        MissingDependencyError: it is not installed (the message says what to install).
    """
    if not openvino_available():
        raise MissingDependencyError("the OpenVINO routes need openvino: pip install openvino")
    import openvino

    return openvino


class OpenVinoGraph(nn.Module):
    """An ONNX graph executed by OpenVINO on CPU; inference only, one float input, first output returned.

    Args:
        onnx_bytes: the serialised graph.
        num_threads: inference threads (None: ``torch.get_num_threads()``).
    """

    runtime = "openvino"

    def __init__(self, onnx_bytes: bytes, num_threads: int | None = None) -> None:
        super().__init__()
        self.onnx_bytes = bytes(onnx_bytes)
        self.num_threads = num_threads
        self._compiled: dict[tuple[int, ...], Any] = {}

    def _model_for(self, shape: tuple[int, ...]) -> Any:
        compiled = self._compiled.get(shape)
        if compiled is None:
            ov = require_openvino()
            core = ov.Core()
            model = core.read_model(self.onnx_bytes, b"")
            model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
            threads = self.num_threads or torch.get_num_threads()
            # f32: without the hint OpenVINO may compute in a lower precision on some CPUs (bf16 on AMX)
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
                      "INFERENCE_PRECISION_HINT": "f32"}
            compiled = self._compiled[shape] = core.compile_model(model, "CPU", config)
        return compiled

    def forward(self, x: Tensor) -> Tensor:
        """Run the graph on a CPU float32 copy of ``x``; the output goes to ``x``'s device."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        compiled = self._model_for(tuple(array.shape))
        result = compiled(array)[compiled.outputs[0]]
        return torch.from_numpy(np.array(result, copy=True)).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = {}  # compiled models are rebuilt on first use by copies
        return state

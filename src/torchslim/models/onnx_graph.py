"""``OnnxGraph``: a module that holds a serialised ONNX graph and runs it with ONNX Runtime.

It is how an int8 model made by ``torchslim.quantize.quantize_static``/``quantize_dynamic`` lives in
PyTorch code and in a ``.slim`` file: the graph's bytes are one uint8 buffer (``graph``), so the
artifact stores exactly the int8 graph ONNX Runtime executes. The factory ``onnx_graph`` records the
buffer size and the metadata (the fp32 model's factory, the quantization config) as its keyword
arguments, so ``torchslim.save``/``torchslim.load`` round-trip it with no extra work::

    graph = OnnxGraph.from_bytes(onnx_bytes, quantization=config.to_dict())
    torchslim.save(graph, "model.slim")
    same = torchslim.load("model.slim")   # same outputs

Inference only: ``forward`` runs the graph on CPU and returns tensors without autograd history.
onnxruntime is imported on the first forward, never when this module is imported.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchslim.errors import DataError, ModelError
from torchslim.models.registry import create_model, register_model
from torchslim.onnx.convert import feed_array
from torchslim.onnx.runtime import ort_session, require_onnx

# inputs of quantized ops that are scales / zero points, not weights (by position)
_QPARAM_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "MatMulInteger": frozenset({2, 3}),
    "ConvInteger": frozenset({2, 3}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    "DynamicQuantizeMatMul": frozenset({2, 3}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
}
# ONNX Runtime's quantizers name scale/zero-point initializers with these suffixes (the dynamic
# quantizer multiplies weight scales in plain Mul nodes, which positions alone cannot tell apart)
_QPARAM_SUFFIXES = ("_scale", "_zero_point")


class OnnxGraph(nn.Module):
    """An ONNX graph (uint8 buffer ``graph``) executed by ONNX Runtime on CPU; inference only.

    Args:
        nbytes: size of the graph in bytes (the buffer starts zeroed; fill it with
            :meth:`from_bytes` or ``load_state_dict``).
        source_factory: factory of the fp32 model the graph was made from (``factory_of(model)``).
        quantization: the quantization config as a dict (``config.to_dict()``), or None.
        num_threads: ORT intra-op threads (None: ``torch.get_num_threads()`` when the session is built).

    Attributes:
        runtime: ``"onnxruntime"``, the runtime that executes this module.
    """

    runtime = "onnxruntime"
    graph: Tensor

    def __init__(
        self,
        nbytes: int = 0,
        *,
        source_factory: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ModelError(f"onnx_graph: nbytes = {nbytes!r} is invalid: expected an integer >= 0")
        self.register_buffer("graph", torch.zeros(nbytes, dtype=torch.uint8))
        self.source_factory = copy.deepcopy(source_factory)
        self.quantization = copy.deepcopy(quantization)
        self.num_threads = num_threads
        self.parity: dict[str, float] | None = None  # set by the quantizers (not saved)
        self.skipped: dict[str, str] = {}  # nodes left in fp32, with the reason (not saved)
        self._session: Any = None
        self._session_key: tuple | None = None
        self._stats: tuple[tuple, dict[str, int]] | None = None

    @classmethod
    def from_bytes(
        cls,
        onnx_bytes: bytes,
        *,
        source_factory: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
    ) -> OnnxGraph:
        """Wrap a serialised ONNX graph; the factory is recorded so ``torchslim.save`` works.

        Args:
            onnx_bytes: the graph (as written by ``onnx.save`` / ``export_onnx``).
            source_factory: factory of the model it came from, for the manifest.
            quantization: quantization config dict, for the manifest.

        Returns:
            The module (eval mode).
        """
        data = bytes(onnx_bytes)
        module = create_model("onnx_graph", nbytes=len(data), source_factory=source_factory,
                              quantization=quantization)
        if data:
            module.graph.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return module.eval()

    def onnx_bytes(self) -> bytes:
        """Return the stored graph as bytes."""
        return self.graph.detach().to("cpu").numpy().tobytes()

    def _key(self) -> tuple:
        # in-place writes (load_state_dict's copy_) bump _version; .to() may swap the tensor
        return (self.graph.data_ptr(), self.graph._version, self.graph.numel())

    def session(self) -> Any:
        """The cached ``onnxruntime.InferenceSession`` for the current graph bytes (built on first use).

        Raises:
            MissingDependencyError: onnxruntime is not installed.
            TorchSlimError: ORT cannot load the bytes (e.g. an unfilled buffer).
        """
        key = self._key()
        if self._session is None or self._session_key != key:
            threads = self.num_threads if self.num_threads is not None else torch.get_num_threads()
            self._session = ort_session(self.onnx_bytes(), threads)
            self._session_key = key
        return self._session

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the graph on CPU copies of ``inputs`` (floats as float32); outputs go to the first input's device.

        Raises:
            DataError: the number of inputs differs from the graph's.
        """
        session = self.session()
        names = [item.name for item in session.get_inputs()]
        if len(inputs) != len(names):
            raise DataError(
                f"OnnxGraph takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}"
            )
        feed = {name: feed_array(item) for name, item in zip(names, inputs, strict=True)}
        device = inputs[0].device if inputs else torch.device("cpu")
        outputs = [torch.from_numpy(array).to(device) for array in session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def slim_stats(self) -> dict[str, int]:
        """Logical size for ``torchslim.measure``.

        Returns:
            ``parameters``: elements of the graph's weight and bias initializers (an int8 weight counts
            as one parameter; scales, zero points and int64 shape constants are not parameters);
            ``nonzero``: those that are not zero; ``storage_bits``: 8 x the graph's bytes.

        Raises:
            MissingDependencyError: onnx is not installed.
        """
        key = self._key()
        if self._stats is None or self._stats[0] != key:
            self._stats = (key, _graph_stats(self.onnx_bytes()))
        return dict(self._stats[1])

    def extra_repr(self) -> str:
        kind = (self.quantization or {}).get("type", "none")
        return f"nbytes={self.graph.numel()}, runtime={self.runtime}, quantization={kind}"

    def __getstate__(self) -> dict[str, Any]:
        # An InferenceSession cannot be pickled or deep-copied: copies rebuild it on first use.
        state = self.__dict__.copy()
        state["_session"] = None
        state["_session_key"] = None
        return state


def _graph_stats(onnx_bytes: bytes) -> dict[str, int]:
    onnx = require_onnx()
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    roles: dict[str, bool] = {}  # initializer name -> used at least once as a weight
    for node in model.graph.node:
        qparams = _QPARAM_INPUTS.get(node.op_type, frozenset())
        for index, name in enumerate(node.input):
            roles[name] = roles.get(name, False) or index not in qparams
    parameters = nonzero = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL):
            continue  # shapes, axes
        if not roles.get(init.name, False) or init.name.endswith(_QPARAM_SUFFIXES):
            continue
        array = numpy_helper.to_array(init)
        parameters += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return {"parameters": parameters, "nonzero": nonzero, "storage_bits": 8 * len(onnx_bytes)}


@register_model("onnx_graph")
def onnx_graph(
    nbytes: int = 0,
    source_factory: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> OnnxGraph:
    """ONNX graph run by ONNX Runtime (int8 models from quantize_static/quantize_dynamic)."""
    return OnnxGraph(nbytes, source_factory=source_factory, quantization=quantization)

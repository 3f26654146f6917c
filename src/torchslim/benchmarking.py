"""``bench``: latency, throughput and peak memory of models in PyTorch and ONNX Runtime, beside their fp32 baseline.

Every run times the fp32 baseline too, in the same process and runtimes, so each row carries its speedup:

- a ``.slim`` file (or a model made by ``torchslim.create_model``): the baseline is the uncompressed model rebuilt
  from the factory in its manifest (for an int8 ``OnnxGraph``, the factory of the model it was made from) with
  fresh weights: the unpruned, unquantized architecture. Weights do not change dense fp32 speed, so fresh ones are
  enough for timing (not for accuracy);
- an ``.onnx`` file: the ``baseline`` argument (an fp32 ``.onnx``/``.slim``/model); without it, an fp32 graph (no
  quantized operators) is its own baseline, and a quantized graph is refused (it cannot be de-quantized back);
- any other ``nn.Module``: ``baseline``, else the module itself when it holds no compressed layers.

Latency is :func:`torchslim.measure.measure_latency` (warm-up, then median and 90th percentile of timed blocks);
ONNX graphs run through :class:`~torchslim.models.onnx_graph.OnnxGraph` (an ORT session behind a module) with the
same intra-op thread count as PyTorch. A PyTorch model runs in ONNX Runtime as the fp32 graph ``torchslim export``
writes (``quant="none"``; packed layers with their dequantized weights). Peak memory: in PyTorch, the profiler's
peak of one forward (:func:`torchslim.measure.memory.peak_memory_bytes`: weights, input and what the forward
allocates); in ONNX Runtime, the resident-memory high-water mark of a fresh process creating the session and
running one batch, minus its resident memory before (Linux ``/proc``; None elsewhere). The two are different
counts: compare memory within a runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchslim._utils import first_line
from torchslim.artifact import load
from torchslim.errors import ConfigError, DataError, TorchSlimError
from torchslim.export.api import export
from torchslim.measure.baseline import factory_baseline
from torchslim.measure.latency import measure_latency, repeat_batch
from torchslim.measure.memory import peak_memory_bytes
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.onnx.runtime import graph_op_types, require_onnx

__all__ = ["RUNTIMES", "BenchReport", "BenchRow", "bench"]

RUNTIMES = ("torch", "onnxruntime")
BASELINE = "fp32 baseline"
_QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "MatMulIntegerToFloat",
}  # fmt: skip
_COMPRESSED_LAYERS = ("IntQuantLayer", "CodebookLayer", "HalfLayer", "OnnxGraph")


@dataclasses.dataclass
class BenchRow:
    """One (model, runtime, batch) measurement.

    Attributes:
        name: the model's label (file name, or ``"fp32 baseline"``).
        runtime: ``torch`` or ``onnxruntime``.
        batch: batch size.
        median_ms, p90_ms: forward latency in milliseconds.
        throughput_per_s: samples per second at the median.
        peak_memory_bytes: see the module docstring (None when not measured).
        speedup_vs_baseline: baseline median / this median, same runtime and batch (1.0 for the baseline).
        speedup_vs_torch_fp32: the baseline's PyTorch-eager median / this median, same batch.
        baseline: this row is the fp32 baseline.
    """

    name: str
    runtime: str
    batch: int
    median_ms: float
    p90_ms: float
    throughput_per_s: float
    peak_memory_bytes: int | None
    speedup_vs_baseline: float | None
    speedup_vs_torch_fp32: float | None
    baseline: bool


@dataclasses.dataclass
class BenchReport:
    """What :func:`bench` measured.

    Attributes:
        rows: the measurements, baseline rows first.
        baseline: the baseline's label and how it was made.
        skipped: ``"name/runtime"`` -> why that combination was not run.
        input_shape: one sample's shape; threads: intra-op threads of every runtime.
    """

    rows: list[BenchRow]
    baseline: dict[str, str]
    skipped: dict[str, str]
    input_shape: list[int]
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "baseline": dict(self.baseline),
            "skipped": dict(self.skipped),
            "input_shape": list(self.input_shape),
            "threads": self.threads,
        }


@dataclasses.dataclass
class _Candidate:
    name: str
    module: nn.Module | None = None  # runs in torch (and is exported for onnxruntime)
    graph: bytes | None = None  # runs in onnxruntime as is


def _label(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name
    return f"{type(item).__name__}" + (f" #{index}" if index else "")


def _load_candidate(item: Any, name: str) -> _Candidate:
    if isinstance(item, nn.Module):
        return _Candidate(name, graph=item.onnx_bytes()) if isinstance(item, OnnxGraph) else _Candidate(name, item)
    if not isinstance(item, (str, os.PathLike)):
        raise DataError(f"cannot benchmark a {type(item).__name__}: expected an nn.Module, a .slim or an .onnx path")
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix == ".onnx":
        return _Candidate(name, graph=path.read_bytes())
    return _load_candidate(load(path), name)


def _is_fp32_graph(graph: bytes) -> bool:
    return not (set(graph_op_types(graph)) & _QUANTIZED_OPS)


def _is_plain(module: nn.Module) -> bool:
    return not any(type(m).__name__ in _COMPRESSED_LAYERS for m in module.modules())


def _resolve_baseline(first: Any, candidate: _Candidate, baseline: Any) -> tuple[_Candidate, str]:
    if baseline is not None:
        return _load_candidate(baseline, BASELINE), f"given: {_label(baseline, 0)}"
    model, how = factory_baseline(first)
    if model is not None:
        return _Candidate(BASELINE, model), how
    if candidate.module is not None and _is_plain(candidate.module):
        return _Candidate(BASELINE, candidate.module), f"{candidate.name} itself (an fp32 model)"
    if candidate.module is None and _is_fp32_graph(candidate.graph):
        return _Candidate(BASELINE, graph=candidate.graph), f"{candidate.name} itself (an fp32 graph)"
    raise ConfigError(
        f"baseline is missing for {candidate.name}: it is compressed (quantized operators or packed layers) and has "
        "no torchslim factory to rebuild the fp32 model from; expected baseline = an fp32 .onnx, .slim or model"
    )


def _example_input(example_inputs: Tensor | None, input_shape: Sequence[int] | None, candidates) -> Tensor:
    if example_inputs is not None:
        if not isinstance(example_inputs, Tensor) or example_inputs.dim() == 0 or example_inputs.shape[0] == 0:
            raise DataError("example_inputs is invalid: expected a tensor with a leading batch dimension")
        return example_inputs[:1].detach().to("cpu", torch.float32)
    if input_shape is None:
        input_shape = _graph_input_shape(candidates)
    if input_shape is None:
        raise DataError("input_shape is missing: expected one sample's shape, e.g. (1, 28, 28), or example_inputs")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise DataError(f"input_shape = {input_shape!r} is invalid: expected positive integers, e.g. (1, 28, 28)")
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))


def _graph_input_shape(candidates: list[_Candidate]) -> tuple[int, ...] | None:
    """One sample's shape: recorded in the first ``.slim`` that has one, or the first graph's fixed input sizes."""
    for candidate in candidates:
        recorded = getattr(candidate.module, "_torchslim_input", None)  # a .slim's recorded input signature
        if recorded:
            return tuple(recorded["shape"])
        if candidate.graph is None:
            continue
        graph = require_onnx().load_from_string(candidate.graph).graph
        initializers = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim[1:]]
        if dims and all(d > 0 for d in dims):
            return tuple(dims)
    return None


def _check_options(runtimes, batch_sizes, threads, warmup, min_run_time) -> tuple[tuple[str, ...], int]:
    runtimes = tuple(runtimes)
    if not runtimes or any(r not in RUNTIMES for r in runtimes):
        raise ConfigError(f"runtimes = {runtimes!r} is invalid: expected a non-empty subset of {', '.join(RUNTIMES)}")
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes = {sizes!r} is invalid: expected positive integers, e.g. (1, 32)")
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads = {threads!r} is invalid: expected None or an integer >= 1")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"warmup = {warmup!r} is invalid: expected an integer >= 0")
    if not (isinstance(min_run_time, (int, float)) and min_run_time > 0):
        raise ConfigError(f"min_run_time = {min_run_time!r} is invalid: expected a number of seconds > 0")
    return runtimes, threads


def bench(
    models_or_paths: Any,
    *,
    example_inputs: Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    runtimes: Sequence[str] = RUNTIMES,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    warmup: int = 3,
    min_run_time: float = 0.2,
    baseline: Any = None,
    memory: bool = True,
) -> BenchReport:
    """Time models (and their fp32 baseline) in PyTorch eager and ONNX Runtime.

    Args:
        models_or_paths: an ``nn.Module``, a ``.slim``/``.onnx`` path, or a list of them (the baseline is made
            from the first, see the module docstring).
        example_inputs: a batch whose first sample is repeated to each batch size; or give ``input_shape``.
        input_shape: one sample's shape (random normal input); default: read from an ``.onnx`` with fixed sizes.
        runtimes: any of ``"torch"``, ``"onnxruntime"``.
        batch_sizes: batch sizes to time.
        threads: intra-op threads for every runtime (default ``torch.get_num_threads()``).
        warmup: untimed runs before timing.
        min_run_time: seconds of timed runs per (model, runtime, batch).
        baseline: the fp32 baseline (model or path); default: derived as described in the module docstring.
        memory: also measure peak memory (one extra forward per row; a subprocess per ONNX Runtime row).

    Returns:
        A :class:`BenchReport`; its baseline rows come first.

    Raises:
        ConfigError: bad options, or no baseline can be made (an int8/int4 ``.onnx`` without ``baseline``).
        DataError: no input shape, or bad inputs.
        FileNotFoundError: a path does not exist.
    """
    items = list(models_or_paths) if isinstance(models_or_paths, (list, tuple)) else [models_or_paths]
    if not items:
        raise ConfigError("models_or_paths is empty: expected at least one model or path")
    runtimes, threads = _check_options(runtimes, batch_sizes, threads, warmup, min_run_time)
    candidates = [_load_candidate(item, _label(item, index)) for index, item in enumerate(items)]
    reference, how = _resolve_baseline(items[0], candidates[0], baseline)
    example = _example_input(example_inputs, input_shape, [*candidates, reference])
    rows: list[BenchRow] = []
    skipped: dict[str, str] = {}
    timing = {"threads": threads, "warmup": warmup, "min_run_time": min_run_time, "memory": memory}
    for candidate in [reference, *candidates]:
        for runtime in runtimes:
            try:
                results = _run(candidate, runtime, example, tuple(batch_sizes), **timing)
            except _Skip as exc:
                skipped[f"{candidate.name}/{runtime}"] = str(exc)
                continue
            for batch, result in results.items():
                rows.append(BenchRow(candidate.name, runtime, batch, **result, speedup_vs_baseline=None,
                                     speedup_vs_torch_fp32=None, baseline=candidate is reference))  # fmt: skip
    _speedups(rows)
    return BenchReport(rows, {"name": BASELINE, "how": how}, skipped, list(example.shape[1:]), threads)


class _Skip(Exception):
    """This model cannot run in this runtime (the message says why)."""


def _run(candidate: _Candidate, runtime: str, example: Tensor, batch_sizes, *, threads, warmup, min_run_time, memory):
    if runtime == "torch":
        if candidate.module is None:
            raise _Skip("an ONNX graph runs in onnxruntime only")
        module = candidate.module
    else:
        graph = candidate.graph if candidate.graph is not None else _fp32_graph(candidate.module, example)
        module = OnnxGraph.from_bytes(graph)
        module.num_threads = threads
    try:
        latency = measure_latency(
            module, example, batch_sizes, num_threads=threads, min_run_time=min_run_time, warmup=warmup
        )
    except (RuntimeError, ValueError, TorchSlimError) as exc:
        raise DataError(
            f"{candidate.name} fails in {runtime} on inputs of shape {tuple(example.shape[1:])}: {first_line(exc)}"
        ) from exc
    results = {}
    for batch, timed in latency.items():
        peak = None
        if memory:
            batch_input = repeat_batch(example, batch)
            if runtime == "torch":
                peak = peak_memory_bytes(module, batch_input)
            else:
                peak = _ort_peak_memory(module.onnx_bytes(), batch_input, threads)
        results[batch] = {
            "median_ms": timed["median_ms"],
            "p90_ms": timed["p90_ms"],
            "throughput_per_s": timed["throughput_per_s"],
            "peak_memory_bytes": peak,
        }
    return results


def _fp32_graph(model: nn.Module, example: Tensor) -> bytes:
    return export(model, None, example_inputs=example).graph


def _speedups(rows: list[BenchRow]) -> None:
    base = {(row.runtime, row.batch): row.median_ms for row in rows if row.baseline}
    for row in rows:
        same = base.get((row.runtime, row.batch))
        eager = base.get(("torch", row.batch))
        row.speedup_vs_baseline = None if same is None else same / row.median_ms
        row.speedup_vs_torch_fp32 = None if eager is None else eager / row.median_ms


_RSS_SCRIPT = """
import json, sys
import numpy as np, onnxruntime as ort
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024
x = np.load(sys.argv[2])
before = kib("VmRSS:")
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[3])
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, {session.get_inputs()[0].name: x})
print(json.dumps(kib("VmHWM:") - before))
"""


def _ort_peak_memory(graph: bytes, batch_input: Tensor, threads: int) -> int | None:
    """Resident-memory high-water increase of a fresh process that loads ``graph`` and runs one batch (Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as directory:
        model_path, input_path = Path(directory) / "model.onnx", Path(directory) / "input.npy"
        model_path.write_bytes(graph)
        np.save(input_path, batch_input.numpy().astype(np.float32))
        result = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(model_path), str(input_path), str(threads)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    if result.returncode != 0:
        return None
    try:
        return int(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return None

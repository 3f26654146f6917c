"""``deploy``: build every runtime route of a model, check each, time them side by side, keep the fastest valid one.

Routes (:data:`ROUTES`; a route that does not apply is listed with the reason):

- ``torch``: the model in PyTorch eager as :func:`torchslim.load` returns it (packed layers on the paths
  :mod:`torchslim.quantize.runtime` measured fastest per layer);
- ``torch-compact``: the same file loaded with ``runtime="compact"`` (integer kernels wherever they apply, no fp32
  copies): the per-layer measurements can mis-predict a whole model (a grouped int4 LLM decoded 2.46x fp32 with
  ``compact`` against 2.02x with ``auto``), so the whole model is timed both ways;
- ``torch-w8a8``: the same file loaded with ``runtime="w8a8"`` (inputs of several rows: int8 x int8 products on
  activations rounded per row; packed Linear layers with one scale per output row), checked like an int8 graph;
- ``torch-compile``: ``torch.compile`` of that model (inductor; the first call compiles; opt-in, see
  :data:`DEFAULT_ROUTES`);
- ``onnxruntime-fp32``, ``onnxruntime-int8-dynamic``, ``onnxruntime-int8-static`` (needs calibration data),
  ``onnxruntime-int4`` (``MatMulNBits``; models with Linear layers): graphs written by :func:`torchslim.export`,
  which checks each against the model (parity) before it is kept;
- ``openvino-fp32``, ``openvino-int8-static``: the same fp32 / QDQ int8 graphs run by OpenVINO (optional
  ``openvino`` package; "not applicable" without it), checked against the model with the export's limits;
- ``openvino-int8-matmul``: a QDQ graph with int8 MatMul/Gemm only, run by OpenVINO: NNCF's transformer placement
  (LayerNorm, Softmax, GELU, residual additions stay float), which OpenVINO ran faster than the all-ops graph on a
  BERT-shaped encoder (models with Linear layers);
- an ONNX graph (``.onnx``, or an int8 ``.slim`` holding one) runs as stored: ``onnxruntime``.

Static int8 routes calibrate activation ranges as the mean over samples of each sample's extremes (``mean-minmax``,
NNCF's default), and keep all 8 bits of the weights where this CPU has an int8 dot product (VNNI/AMX, ARM; else 7
bits, see :func:`route_export_config`): the graph is built for the machine that times it.

Each built route is checked: parity with the model (torch routes: outputs within fp32 tolerance; ONNX routes: the
export's own check), and with ``data``, top-1 accuracy on its test split no more than ``max_accuracy_drop``
points below the model's. The valid routes and the fp32 baseline (the uncompressed model, see :func:`bench`'s
rules) are timed in the same process in five interleaved rounds (baseline, route 1, route 2, ...; each a median
of repeated runs after warm-up), and each keeps the median of its rounds. The route with the best geometric-mean
speedup over the batch sizes is written to ``out_dir`` (``model.slim`` for torch routes, ``model.onnx`` for ONNX
Runtime and OpenVINO, which read it as it is) with ``deploy.md`` and ``deploy.json``, the table of every route.
Nothing is written when no route is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchslim import progress as progress_lib
from torchslim._utils import cpu_has_int8_dot_product, first_line
from torchslim.artifact import load, save
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, TorchSlimError
from torchslim.export import ExportConfig, export
from torchslim.export.api import FP32_ATOL, FP32_RTOL, PARITY_LIMITS
from torchslim.export.openvino import OpenVinoGraph, openvino_available
from torchslim.fileio import atomic_write_bytes, atomic_write_text
from torchslim.hf import load_hf
from torchslim.kernels.cpu_int8mm import unsupported_reason
from torchslim.measure._common import call
from torchslim.measure.baseline import factory_baseline
from torchslim.measure.latency import measure_latency
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.onnx.convert import compare_outputs
from torchslim.quantize.runtime import runtime_report, set_runtime_
from torchslim.train import evaluate

__all__ = ["DEFAULT_ROUTES", "ROUTES", "DeployConfig", "DeployReport", "RouteResult", "deploy"]

ROUTES = (
    "torch",
    "torch-compact",
    "torch-w8a8",
    "torch-compile",
    "onnxruntime-fp32",
    "onnxruntime-int8-dynamic",
    "onnxruntime-int8-static",
    "onnxruntime-int4",
    "openvino-fp32",
    "openvino-int8-static",
    "openvino-int8-matmul",
)
# torch-compile is opt-in: in one scratch ts.deploy run it compiled for about 10 s on 2 cores and was slower than
# eager on an int4 lenet5 (0.39x fp32 at batch 1), because the compiled graph dequantizes on every call.
DEFAULT_ROUTES = tuple(r for r in ROUTES if r != "torch-compile")


@register_config("deploy")
@dataclasses.dataclass(frozen=True)
class DeployConfig(Config):
    """What :func:`deploy` tries and how it times: validated on construction.

    Attributes:
        target: the hardware target; ``"cpu"``.
        batch_sizes: batch sizes to time (the choice maximises the geometric-mean speedup over them); integers >= 1.
        routes: the routes to try (default: :data:`DEFAULT_ROUTES`, every route but ``torch-compile``).
        max_accuracy_drop: largest allowed accuracy loss of a route vs the model, in percentage points [0, 100].
        num_threads: intra-op threads for every runtime (>= 1; default: ``torch.get_num_threads()``).
        min_run_time: seconds of timed runs per route and batch size (> 0).
    """

    target: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 32)
    routes: tuple[str, ...] | None = None
    max_accuracy_drop: float = 0.5
    num_threads: int | None = None
    min_run_time: float = 0.2

    def __post_init__(self) -> None:
        # sequences given as lists (keywords, YAML) are stored as tuples, so the config stays hashable and frozen
        for name in ("batch_sizes", "routes"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        if self.target not in TARGETS:
            raise self.fail("target", self.target, "one of " + ", ".join(map(repr, TARGETS)))
        if self.routes is not None and not isinstance(self.routes, tuple):
            raise self.fail("routes", self.routes, "a list of route names, or None for the default routes")
        for name in self.wanted:
            if name not in ROUTES:
                raise ConfigError(f"{type(self).__name__}.routes contains {name!r}: expected some of "
                                  f"{', '.join(ROUTES)}")
        if not self.wanted:
            raise ConfigError(f"{type(self).__name__}.routes is empty: expected at least one of {', '.join(ROUTES)}")
        sizes = self.batch_sizes
        if not isinstance(sizes, tuple) or not sizes or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
            raise self.fail("batch_sizes", list(sizes) if isinstance(sizes, tuple) else sizes, "integers >= 1")
        value = self.max_accuracy_drop
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise self.fail("max_accuracy_drop", value, "points in [0, 100]")
        if self.num_threads is not None:
            self.check_int("num_threads", 1)
        self.check_float("min_run_time", 0, lo_inclusive=False)

    @property
    def wanted(self) -> tuple[str, ...]:
        """The routes to try (``routes``, or :data:`DEFAULT_ROUTES`)."""
        return DEFAULT_ROUTES if self.routes is None else self.routes
_ROUNDS = 5  # interleaved timing rounds (see _time_interleaved)
TARGETS = ("cpu",)
# how each ONNX-graph route exports. All-ops int8 graphs (CNNs) calibrate activation ranges as the mean of the
# calibration samples' extremes (NNCF's default); the MatMul-only graph has symmetric int8 activations (uint8 for
# lopsided ones) with percentile ranges and SmoothQuant 0.8: the BERT-shaped encoder of benchmarks/cpu_speed.py by
# OpenVINO, cosine 0.9999783 vs NNCF's 0.9999780 at NNCF's speed (2026-12-04 19:06 UTC run); asymmetric activations
# ran 10-15% slower there (scratch)
_ROUTE_EXPORT = {
    "onnxruntime-fp32": ExportConfig(),
    "onnxruntime-int8-dynamic": ExportConfig(quant="int8-dynamic"),
    "onnxruntime-int8-static": ExportConfig(quant="int8-static", observer="mean-minmax"),
    "onnxruntime-int4": ExportConfig(quant="int4-weight"),
    "openvino-fp32": ExportConfig(),
    "openvino-int8-static": ExportConfig(quant="int8-static", observer="mean-minmax"),
    "openvino-int8-matmul": ExportConfig(quant="int8-static", static_ops="matmul", symmetric_activations=True,
                                         observer="percentile", smooth_quant=0.8),
}
_PARITY_SAMPLES = 64


@dataclasses.dataclass
class RouteResult:
    """One route: whether it is valid, why not, and its latency beside the baseline.

    Attributes:
        name: the route (one of :data:`ROUTES`, or ``onnxruntime`` for a stored graph).
        status: ``"ok"``, ``"rejected"`` (built, failed a check) or ``"not applicable"``.
        reason: why it was rejected or does not apply ("" when ok).
        parity: ``max_abs_error``/``cosine``/``top1_agreement`` vs the model (None when not built).
        accuracy: top-1 accuracy on the test split (None without data).
        latency_ms: ``{batch: median ms}``.
        speedup: ``{batch: baseline ms / route ms}``.
        artifact_bytes: bytes of the file this route writes.
    """

    name: str
    status: str
    reason: str = ""
    parity: dict[str, float] | None = None
    accuracy: float | None = None
    latency_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    speedup: dict[int, float] = dataclasses.field(default_factory=dict)
    artifact_bytes: int | None = None
    module: nn.Module | None = dataclasses.field(default=None, repr=False)
    payload: bytes | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (without the module and bytes)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("module", "payload")}
        data["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        data["speedup"] = {str(k): v for k, v in self.speedup.items()}
        return data


@dataclasses.dataclass
class DeployReport:
    """What :func:`deploy` built, measured and wrote.

    Attributes:
        source: the model's label; baseline: how the fp32 baseline was obtained.
        batch_sizes: the timed batch sizes; threads: intra-op threads of every runtime.
        baseline_ms: ``{batch: median ms}`` of the fp32 baseline in PyTorch eager.
        model_accuracy: the model's own test accuracy (None without data).
        routes: every route, valid or not.
        chosen: the fastest valid route; path: the file written (None when ``out_dir`` was None).
    """

    source: str
    baseline: str
    batch_sizes: list[int]
    threads: int
    baseline_ms: dict[int, float]
    model_accuracy: float | None
    routes: list[RouteResult]
    chosen: str
    path: str | None = None

    def route(self, name: str) -> RouteResult:
        """The route called ``name``.

        Raises:
            KeyError: no such route.
        """
        for item in self.routes:
            if item.name == name:
                return item
        raise KeyError(name)

    @property
    def best(self) -> RouteResult:
        """The chosen route."""
        return self.route(self.chosen)

    def summary(self) -> dict[str, Any]:
        """What a report row keeps: ``route``, ``speedup`` and ``latency_ms`` (by batch, as strings), ``path``,
        ``routes`` (name -> status)."""
        best = self.best
        return {"route": best.name, "speedup": {str(b): s for b, s in best.speedup.items()},
                "latency_ms": {str(b): ms for b, ms in best.latency_ms.items()}, "path": self.path,
                "routes": {r.name: r.status for r in self.routes}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "routes"}
        data["baseline_ms"] = {str(k): v for k, v in self.baseline_ms.items()}
        data["routes"] = [r.to_dict() for r in self.routes]
        return data

    def to_markdown(self) -> str:
        """The route table (speedups vs the fp32 baseline in PyTorch eager) with the reasons."""
        heads = ["route", "status"] + [f"b{b} ms" for b in self.batch_sizes] + [f"b{b} speedup" for b in
                                                                                self.batch_sizes]
        heads += ["accuracy", "bytes", "note"]
        lines = [
            f"# deploy: {self.source}",
            "",
            f"Baseline: {self.baseline} ("
            + ", ".join(f"b{b} {self.baseline_ms[b]:.3f} ms" for b in self.batch_sizes)
            + f"), PyTorch eager, {self.threads} threads, same process. Chosen: **{self.chosen}**"
            + (f" -> `{self.path}`." if self.path else "."),
            "",
            "| " + " | ".join(heads) + " |",
            "|" + "---|" * len(heads),
        ]
        for r in self.routes:
            cells = [r.name + (" (chosen)" if r.name == self.chosen else ""), r.status]
            cells += [f"{r.latency_ms[b]:.3f}" if b in r.latency_ms else "" for b in self.batch_sizes]
            cells += [f"{r.speedup[b]:.2f}x" if b in r.speedup else "" for b in self.batch_sizes]
            cells += ["" if r.accuracy is None else f"{r.accuracy:.2%}", "" if r.artifact_bytes is None else
                      f"{r.artifact_bytes:,}", r.reason.replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def deploy(
    model: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    config: DeployConfig | None = None,
    *,
    data: Any = None,
    example_inputs: Tensor | None = None,
    reference: nn.Module | str | os.PathLike | None = None,
    force: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> DeployReport:
    """Build every route of ``model``, check and time them against the fp32 baseline, write the fastest valid one.

    Args:
        model: an ``nn.Module``, a ``.slim`` file or an ``.onnx`` file.
        out_dir: where to write the chosen artifact, ``deploy.md`` and ``deploy.json`` (created); None writes
            nothing.
        config: a :class:`DeployConfig` (target, batch sizes, routes, accuracy budget, threads, timing); default
            ``DeployConfig()``.
        data: ``DataSplits`` (test split: accuracy check and parity inputs; train split: int8 calibration).
        example_inputs: an input batch when there is no ``data``; default: the input signature recorded in a
            ``.slim`` file.
        reference: the fp32 model to time as the baseline (module or file); default: rebuilt from the model's
            factory (uncompressed architecture), else the model itself when it is fp32.
        force: replace files in ``out_dir``.
        progress: a bar over the routes and the timing rounds, or one line after the routes are built and one
            after timing (:mod:`torchslim.progress`); None follows the process setting.
        **options: :class:`DeployConfig` fields as keywords (``batch_sizes=(1,)``, ``routes=[...]``), applied on
            top of ``config``.

    Returns:
        A :class:`DeployReport`.

    Raises:
        ConfigError: unknown target, route or option, bad batch sizes, budget, threads or timing (before any
            work).
        DataError: no input to run the model on.
        TorchSlimError: no route is valid (nothing is written), or ``out_dir`` holds a deployment (without
            ``force``).
    """
    config = _deploy_config(config, options)
    wanted, batch_sizes, max_accuracy_drop = list(config.wanted), config.batch_sizes, config.max_accuracy_drop
    threads = torch.get_num_threads() if config.num_threads is None else config.num_threads
    source_label = Path(model).name if isinstance(model, (str, os.PathLike)) else type(model).__name__
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / "deploy.json").exists() and not force:
        raise TorchSlimError(f"out_dir {str(out)!r} already holds a deployment: pass --force (force=True) to replace")
    module, stored_graph = _load_model(model)
    example = _example(module, data, example_inputs)
    parity_inputs = _parity_inputs(data, example)
    baseline, how = _baseline(model, module, reference)
    model_accuracy = _accuracy(module, data)

    building = 0 if stored_graph is not None else len(wanted)
    with progress_lib.task(f"deploy {source_label}", building + _ROUNDS, progress=progress) as bar:
        results = _build_routes(wanted, model, module, stored_graph, data, example, parity_inputs, bar)
        for result in results:
            if result.status == "ok" and data is not None:
                _check_accuracy(result, data, model_accuracy, max_accuracy_drop)
        valid = [r for r in results if r.status == "ok"]
        if not valid:
            raise TorchSlimError(f"deploy: no route is valid for {source_label}: " +
                                 "; ".join(f"{r.name}: {r.reason}" for r in results))
        bar.line(f"{len(valid)} of {len(results)} routes valid ({', '.join(r.name for r in valid)}); timing them")
        timings = _time_interleaved([baseline] + [r.module for r in valid], example, batch_sizes, threads,
                                    config.min_run_time, on_round=lambda: bar.advance(info="timing"))
    baseline_ms = timings[0]
    best = _fastest(valid, timings, batch_sizes)
    progress_lib.say(f"deploy {source_label}: chose {best.name}, "
                     + ", ".join(f"{s:.2f}x at batch {b}" for b, s in best.speedup.items()), progress=progress)
    report = DeployReport(source=source_label, baseline=how, batch_sizes=list(batch_sizes), threads=threads,
                          baseline_ms=baseline_ms, model_accuracy=model_accuracy, routes=results, chosen=best.name)
    if out is not None:
        report.path = str(_write(out, best, report))
    return report


def _build_routes(names: list[str], model: Any, module: nn.Module, stored_graph: bytes | None, data: Any,
                  example: Tensor, parity_inputs: Any, bar: progress_lib.Task) -> list[RouteResult]:
    """Build and parity-check each route of ``names`` (advancing ``bar``); an ONNX graph is its one route, as stored."""
    if stored_graph is not None:  # an ONNX graph runs as stored; re-exporting it is not a route
        return [RouteResult("onnxruntime", "ok", "the stored graph", module=module, payload=stored_graph,
                            artifact_bytes=len(stored_graph))]
    payload = Path(model).read_bytes() if _is_file_argument(model) else None  # torch routes' file
    results = []
    for name in names:
        bar.update(info=name)
        results.append(_build(name, module, payload, data, example, parity_inputs))
        bar.advance()
    return results


def _fastest(valid: list[RouteResult], timings: list[dict[int, float]], batch_sizes: Sequence[int]) -> RouteResult:
    """Record each valid route's latency and speedup (``timings[0]`` is the baseline's); the best geometric mean."""
    baseline_ms = timings[0]
    for result, latency in zip(valid, timings[1:], strict=True):
        result.latency_ms = latency
        result.speedup = {b: baseline_ms[b] / latency[b] for b in batch_sizes}
    return max(valid, key=lambda r: math.fsum(math.log(s) for s in r.speedup.values()))


def _deploy_config(config: DeployConfig | None, options: dict[str, Any]) -> DeployConfig:
    """``config`` (default ``DeployConfig()``) with the keyword ``options`` applied.

    Raises:
        ConfigError: ``config`` is not a DeployConfig, an option is not one of its fields, or a value is invalid.
    """
    config = DeployConfig() if config is None else config
    if not isinstance(config, DeployConfig):
        raise ConfigError(f"config must be a DeployConfig, got {type(config).__name__}")
    fields = [f.name for f in dataclasses.fields(DeployConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"deploy() got an unknown option {unknown[0]!r}: expected DeployConfig fields "
                          f"({', '.join(fields)}) or data, example_inputs, reference, force, progress")
    return config.replace(**options) if options else config

def _load_model(model: Any) -> tuple[nn.Module, bytes | None]:
    """(module, stored graph bytes or None)."""
    if isinstance(model, nn.Module):
        module = model
    elif isinstance(model, str) and model.startswith("hf:"):  # a local Hugging Face directory
        module = load_hf(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(2, "No such file", str(path))
        if path.suffix == ".onnx":
            module = OnnxGraph.from_bytes(path.read_bytes())
        else:
            module = load(path)
    else:
        raise DataError(f"model = {type(model).__name__} is invalid: expected an nn.Module, a .slim or an .onnx path")
    module.eval()
    return module, module.onnx_bytes() if isinstance(module, OnnxGraph) else None


def _example(module: nn.Module, data: Any, example_inputs: Any) -> Tensor | tuple[Tensor, ...]:
    if isinstance(example_inputs, (tuple, list)) and example_inputs:  # several inputs: token ids, attention mask
        return tuple(_one_example(t) for t in example_inputs)
    if example_inputs is not None:
        return _one_example(example_inputs)
    if data is not None and hasattr(data, "example_inputs"):
        return data.example_inputs(1)
    signature = getattr(module, "_torchslim_input", None)  # set by load from the .slim's manifest
    if signature:
        return torch.rand((1, *signature["shape"]), generator=torch.Generator().manual_seed(0))
    raise DataError("example_inputs is missing: expected data (--data), example_inputs (--input-shape) or a .slim "
                    "that records its input signature")


def _is_file_argument(model: Any) -> bool:
    """A ``.slim``/``.onnx`` path (not a module, not ``hf:DIR``)."""
    return isinstance(model, (str, os.PathLike)) and not str(model).startswith("hf:")


def _one_example(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] == 0:
        raise DataError("example_inputs is invalid: expected a tensor with a leading batch dimension, or a tuple of "
                        "them (token ids and an attention mask)")
    value = value[:1].detach()
    return value.float() if value.is_floating_point() else value


def _parity_inputs(data: Any, example: Any) -> Any:
    if data is not None and hasattr(data, "test"):
        return data.test.tensors[0][:_PARITY_SAMPLES]
    return example


def _baseline(model: Any, module: nn.Module, reference: Any) -> tuple[nn.Module, str]:
    if reference is not None:
        if isinstance(reference, nn.Module):
            return reference.eval(), f"given ({type(reference).__name__})"
        loaded, _ = _load_model(reference)
        return loaded, f"given: {Path(reference).name}"
    rebuilt, how = factory_baseline(model if _is_file_argument(model) else module)
    if rebuilt is not None:
        return rebuilt, how
    if not isinstance(module, OnnxGraph) and not any(hasattr(m, "weight_shape") for m in module.modules()):
        return module, "the model itself (fp32)"
    raise ConfigError("reference is missing: the model is compressed and has no torchslim factory to rebuild the "
                      "fp32 model from; expected reference = the fp32 model or file")


def _accuracy(module: nn.Module, data: Any) -> float | None:
    if data is None or not hasattr(data, "test"):
        return None
    return evaluate(module, data.test)


def _build(name: str, module: nn.Module, payload: bytes | None, data: Any, example: Tensor,
           parity_inputs: Tensor) -> RouteResult:
    if name == "torch":
        return _torch_route(name, module, parity_inputs, payload)
    if name == "torch-compact":
        if not any(hasattr(m, "weight_shape") for m in module.modules()):
            return RouteResult(name, "not applicable", "no packed layers (runtime='compact' changes nothing)")
        return _runtime_route(name, module, payload, parity_inputs, "compact", "fp32")
    if name == "torch-w8a8":
        if all(unsupported_reason(m) is not None for m in module.modules() if hasattr(m, "weight_shape")):
            return RouteResult(name, "not applicable", "no packed Linear layer with one scale per output row")
        result = _runtime_route(name, module, payload, parity_inputs, "w8a8", "int8")
        report = runtime_report(result.module) if result.status == "ok" else []
        if report and not any(row["paths"].get("rows") == "int8mm" for row in report):
            reasons = sorted({row["reasons"].get("rows", "") for row in report},
                             key=lambda reason: "ms vs dense" not in reason)  # a measured layer's reason first
            return RouteResult(name, "not applicable", "no layer takes the int8 product here (the same computation "
                               f"as the torch route): {first_line(reasons[0], 160)}")
        return result
    if name == "torch-compile":
        try:
            compiled = torch.compile(copy.deepcopy(module))
            result = _torch_route(name, compiled, parity_inputs, payload, reference=module)
        except Exception as exc:  # noqa: BLE001 - inductor failures vary; the route is reported, not fatal
            return RouteResult(name, "rejected", f"torch.compile failed: {first_line(exc, 300)}")
        return result
    return _onnx_route(name, module, data, example, parity_inputs)


def _runtime_route(name: str, module: nn.Module, payload: bytes | None, parity_inputs: Any, runtime: str,
                   family: str) -> RouteResult:
    """The same file loaded with ``ts.load(path, runtime=runtime)``, checked against the model with ``family``'s
    limits."""
    other = copy.deepcopy(module)
    set_runtime_(other, runtime)
    result = _torch_route(name, other, parity_inputs, payload, reference=module, family=family)
    result.reason = result.reason or f"load with ts.load(path, runtime={runtime!r})"
    return result


def _torch_route(name: str, module: nn.Module, parity_inputs: Tensor, payload: bytes | None,
                 reference: nn.Module | None = None, family: str = "fp32") -> RouteResult:
    result = RouteResult(name, "ok", module=module, payload=payload,
                         artifact_bytes=None if payload is None else len(payload))
    if reference is None:
        return result  # the model itself: its parity is exact by definition
    with torch.inference_mode():
        want, got = call(reference, parity_inputs), call(module, parity_inputs)
    return _check_outputs(result, want, got, family)


def _check_outputs(result: RouteResult, want: Tensor, got: Tensor, family: str) -> RouteResult:
    """Parity of a route's outputs with the model's: :func:`torchslim.export`'s check and limits for ``family``."""
    min_cosine, min_agreement = PARITY_LIMITS[family]
    exact = family == "fp32"
    try:
        result.parity = compare_outputs(want, got, atol=FP32_ATOL if exact else None, rtol=FP32_RTOL if exact else 0.0,
                                        min_agreement=min_agreement, min_cosine=min_cosine)
    except TorchSlimError as exc:
        result.status, result.reason = "rejected", first_line(exc, 300)
    return result


def _onnx_route(name: str, module: nn.Module, data: Any, example: Tensor, parity_inputs: Tensor) -> RouteResult:
    if name.startswith("openvino-"):
        return _openvino_route(name, module, data, example, parity_inputs)
    config = route_export_config(name)
    quant = config.quant
    if quant == "int8-static" and isinstance(example, tuple):
        return RouteResult(name, "not applicable", "static int8 calibrates one float input (token models: "
                           "int8-dynamic)")
    if quant == "int8-static" and data is None:
        return RouteResult(name, "not applicable", "needs calibration data (--data)")
    if quant in ("int8-dynamic", "int4-weight") and not _has_linear(module):
        return RouteResult(name, "not applicable", "no Linear layers (it quantizes MatMul/Gemm only)")
    try:
        report = export(module, None, config, example_inputs=example,
                        calib_data=None if quant != "int8-static" else data, parity_inputs=parity_inputs)
    except TorchSlimError as exc:
        return RouteResult(name, "rejected", first_line(exc, 300))
    graph = OnnxGraph.from_bytes(report.graph)
    reason = "; ".join([*_int8_notes(config), *report.notes[:2]])
    return RouteResult(name, "ok", reason, parity=dict(report.parity), module=graph,
                       payload=report.graph, artifact_bytes=len(report.graph))


def _openvino_route(name: str, module: nn.Module, data: Any, example: Tensor, parity_inputs: Tensor) -> RouteResult:
    """The graph ``ts.export`` writes (fp32 or QDQ int8), run by OpenVINO instead of ONNX Runtime."""
    if not openvino_available():
        return RouteResult(name, "not applicable", "openvino is not installed (pip install openvino)")
    config = route_export_config(name)
    quant = config.quant
    if isinstance(example, tuple):
        return RouteResult(name, "not applicable", "OpenVinoGraph runs models with one float input")
    if quant == "int8-static" and data is None:
        return RouteResult(name, "not applicable", "needs calibration data (--data)")
    if config.static_ops == "matmul" and not _has_linear(module):
        return RouteResult(name, "not applicable", "no Linear layers (it quantizes MatMul/Gemm only)")
    try:
        report = export(module, None, config, example_inputs=example,
                        calib_data=None if quant == "none" else data, parity_inputs=parity_inputs)
        graph = OpenVinoGraph(report.graph)
        with torch.inference_mode():
            want, got = module(parity_inputs), graph(parity_inputs)
    except Exception as exc:  # noqa: BLE001 - export or OpenVINO compile failures vary; reported, not fatal
        return RouteResult(name, "rejected", first_line(exc, 300))
    reason = "; ".join(["the ONNX graph, run by OpenVINO", *_int8_notes(config)])
    result = RouteResult(name, "ok", reason, module=graph, payload=report.graph,
                         artifact_bytes=len(report.graph))
    return _check_outputs(result, want, got, "fp32" if quant == "none" else "int8")


def route_export_config(name: str) -> ExportConfig:
    """The :class:`ExportConfig` an ONNX-graph route (``onnxruntime-*``, ``openvino-*``) exports with on this CPU.

    int8 weights keep all 8 bits where this CPU has an int8 dot product (VNNI/AMX, ARM): a deployed graph is built
    for the machine that times it, and 7-bit weights only guard against saturated sums on x86 CPUs without one.

    Args:
        name: a route in :data:`ROUTES` that runs an ONNX graph.

    Returns:
        The config (parity limits at the mode's defaults).

    Raises:
        ConfigError: ``name`` is not such a route.
    """
    if name not in _ROUTE_EXPORT:
        raise ConfigError(f"route = {name!r} is invalid: expected one of {', '.join(_ROUTE_EXPORT)}")
    config = _ROUTE_EXPORT[name]
    if config.family == "int8" and cpu_has_int8_dot_product():
        config = config.replace(reduce_range=False)
    return config


def _int8_notes(config: ExportConfig) -> list[str]:
    """Notes on the int8 weights' width and SmoothQuant (empty for other modes)."""
    if config.family != "int8":
        return []
    if config.reduce_range:
        notes = ["7-bit int8 weights (this CPU has no int8 dot product: VNNI/AMX)"]
    else:
        notes = ["8-bit int8 weights (this CPU has an int8 dot product)"]
    if config.smooth_quant is not None:
        notes.append(f"SmoothQuant alpha {config.smooth_quant:g}")
    return notes


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or getattr(m, "op", None) == "linear" for m in module.modules())


def _check_accuracy(result: RouteResult, data: Any, model_accuracy: float | None, budget: float) -> None:
    result.accuracy = evaluate(result.module, data.test)
    if model_accuracy is not None and (model_accuracy - result.accuracy) * 100 > budget + 1e-9:
        result.status = "rejected"
        result.reason = (f"accuracy {result.accuracy:.2%} is {(model_accuracy - result.accuracy) * 100:.2f} points "
                         f"below the model's {model_accuracy:.2%} (budget {budget:g})")


def _time_interleaved(modules: list[nn.Module], example: Tensor, batch_sizes: Sequence[int], threads: int,
                      min_run_time: float, rounds: int = _ROUNDS,
                      on_round: Callable[[], Any] | None = None) -> list[dict[int, float]]:
    """Median ms per module and batch size, timed in ``rounds`` interleaved rounds (baseline, route 1, route 2, ...).

    Interleaving spreads slow drifts of the machine (clock, other processes, runtimes' idle threads) over every
    module instead of charging them to whichever was timed during the drift.
    """
    samples: list[dict[int, list[float]]] = [{b: [] for b in batch_sizes} for _ in modules]
    for _ in range(rounds):
        for index, module in enumerate(modules):
            timed = measure_latency(module, example, tuple(batch_sizes), num_threads=threads,
                                    min_run_time=min_run_time / rounds, warmup=2)
            for b in batch_sizes:
                samples[index][b].append(timed[b]["median_ms"])
        if on_round is not None:
            on_round()
    return [{b: statistics.median(values[b]) for b in batch_sizes} for values in samples]


def _write(out: Path, best: RouteResult, report: DeployReport) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if best.name.startswith("torch"):
        path = out / "model.slim"
        if best.payload is not None:
            atomic_write_bytes(path, best.payload)
        else:
            save(_original(best.module), path)
    else:
        path = out / "model.onnx"
        atomic_write_bytes(path, best.payload or b"")
    report.path = str(path)
    atomic_write_text(out / "deploy.json", json.dumps(report.to_dict(), indent=1))
    atomic_write_text(out / "deploy.md", report.to_markdown())
    return path


def _original(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # a torch.compile wrapper saves the model it wraps

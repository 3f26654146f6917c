"""Quantization side by side on one trained lenet5: torchslim vs torch.ao.quantization vs ONNX Runtime.

One run trains lenet5 on digits (``RECOMMENDED["lenet5"]``, seed 0), then compresses that same model
every way and measures each result the same way: bytes of the file it is saved as (its native
format: ``.slim``, ``.onnx``, or ``torch.save`` of the state dict for torch.ao), top-1 accuracy on
the digits test split, top-1 agreement with the fp32 model, and forward latency (median and p90
over repeated timed blocks, after warm-up, with ``torchslim.measure.measure_latency``; ONNX graphs
are timed through ``OnnxGraph``, the thin module that feeds an ORT session, so every row pays the
same torch <-> numpy hand-off). Every runtime gets the same number of intra-op threads.

Rows:
- fp32, torch eager;
- torchslim weight-only ``IntQuant`` 8 and 4 bit (packed weights, dequantized in forward; torch);
- torchslim static int8 (ORT QDQ, one row per observer) and dynamic int8 (ORT);
- the fp32 ONNX graph in ORT;
- ``torch.ao.quantization`` eager-mode *static* quantization (QuantWrapper, Linear+ReLU fused,
  x86 backend qconfig, calibrated on the same samples);
- ONNX Runtime's own ``quantize_static`` and ``quantize_dynamic`` applied to the fp32 ONNX file
  with their default settings.

Usage: ``python benchmarks/quantization.py [--threads 1] [--out benchmarks/results/quantization.md]``
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import torchslim as ts
from torchslim.export import export_onnx, optimized_op_types
from torchslim.fileio import atomic_write_text
from torchslim.measure import measure_latency
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.quantize import IntQuant, quantize_
from torchslim.quantize.int8 import (
    DynamicInt8,
    StaticInt8,
    calibration_inputs,
    quantize_dynamic,
    quantize_static,
)
from torchslim.train import RECOMMENDED, evaluate, train

COMPUTE_OPS = {
    "Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "QLinearConv", "QGemm", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
}
TORCH_COMPUTE = {"Conv2d", "Linear", "LinearReLU", "ConvReLU2d", "IntQuantLayer"}
CALIBRATION_SAMPLES = 256


@dataclasses.dataclass
class Row:
    method: str
    runtime: str
    file_bytes: int
    accuracy: float
    agreement: float
    latency: dict
    kernels: str


def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _ort_kernels(data: bytes) -> str:
    ops = optimized_op_types(data)
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()) if op in COMPUTE_OPS)


def _torch_kernels(model: nn.Module) -> str:
    counts = collections.Counter(
        ("int8 " if ".quantized" in type(m).__module__ else "") + type(m).__name__
        for m in model.modules()
        if type(m).__name__ in TORCH_COMPUTE
    )
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def _ort_default_static(fp32_path: Path, out: Path, calib: torch.Tensor) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"input": calib[i : i + 64].numpy()} for i in range(0, len(calib), 64))

        def get_next(self):
            return next(self.batches, None)

    ort_quantize_static(str(fp32_path), str(out), Reader())
    return out.read_bytes()


def _ort_default_dynamic(fp32_path: Path, out: Path) -> bytes:
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(str(fp32_path), str(out))
    return out.read_bytes()


def _torch_ao_static(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import QuantWrapper, convert, fuse_modules, get_default_qconfig, prepare

    torch.backends.quantized.engine = "x86"
    float_model = copy.deepcopy(model).eval()
    fuse_modules(float_model, [["5", "6"]], inplace=True)  # Linear(800, 500) + ReLU
    wrapped = QuantWrapper(float_model)
    wrapped.qconfig = get_default_qconfig("x86")
    prepare(wrapped, inplace=True)
    with torch.no_grad():
        for start in range(0, len(calib), 64):
            wrapped(calib[start : start + 64])
    return convert(wrapped, inplace=True).eval()


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return model


def run(threads: int, out_path: Path) -> str:
    """Train, compress every way, measure, and return (and write) the Markdown report."""
    import onnxruntime

    started = time.perf_counter()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on the root logger
    warnings.filterwarnings("ignore")  # torch.ao and the TorchScript exporter are deprecated, still work
    data = ts.load_data("digits")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ts.create_model("lenet5")
    train(model, data.train, RECOMMENDED["lenet5"])
    model.eval()
    x_test = data.test.tensors[0]
    reference = _predictions(model, x_test)
    example = data.example_inputs(1)
    calib = calibration_inputs(data, CALIBRATION_SAMPLES)
    rows: list[Row] = []

    def add(method: str, runtime: str, module: nn.Module, path: Path, kernels: str) -> None:
        if isinstance(module, OnnxGraph):
            module.num_threads = threads
        latency = measure_latency(module, example, (1, 32), num_threads=threads, min_run_time=0.3)
        rows.append(Row(method, runtime, path.stat().st_size, evaluate(module, data.test),
                        float((_predictions(module, x_test) == reference).float().mean()), latency, kernels))
        print(f"  {method}: done", flush=True)

    with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as name:
        tmp = Path(name)
        add("fp32", "torch eager", model, ts.save(model, tmp / "fp32.slim"), _torch_kernels(model))
        for bits in (8, 4):
            packed = copy.deepcopy(model)
            quantize_(packed, IntQuant(bits=bits))
            add(f"torchslim IntQuant {bits}-bit weight-only (per channel)", "torch eager (dequantize in forward)",
                packed, ts.save(packed, tmp / f"int{bits}.slim"), _torch_kernels(packed))
        for observer in ("minmax", "percentile", "mse"):
            graph = quantize_static(model, data, StaticInt8(observer=observer))
            add(f"torchslim static int8 ({observer})", graph.runtime, graph,
                ts.save(graph, tmp / f"static-{observer}.slim"), _ort_kernels(graph.onnx_bytes()))
        graph = quantize_dynamic(model, DynamicInt8(), example_inputs=example)
        add("torchslim dynamic int8 (Linear layers)", graph.runtime, graph, ts.save(graph, tmp / "dynamic.slim"),
            _ort_kernels(graph.onnx_bytes()))
        fp32_path = tmp / "fp32.onnx"
        fp32_onnx = export_onnx(model, example, fp32_path)
        add("fp32 ONNX", "onnxruntime", OnnxGraph.from_bytes(fp32_onnx), fp32_path, _ort_kernels(fp32_onnx))
        ao = _torch_ao_static(model, calib)
        ao_path = tmp / "torch_ao.pt"
        torch.save(ao.state_dict(), ao_path)
        add("torch.ao.quantization static int8 (eager, x86)", "torch eager (x86/fbgemm int8)", ao, ao_path,
            _torch_kernels(ao))
        ort_static = _ort_default_static(fp32_path, tmp / "ort_static.onnx", calib)
        add("ORT quantize_static (defaults)", "onnxruntime", OnnxGraph.from_bytes(ort_static),
            tmp / "ort_static.onnx", _ort_kernels(ort_static))
        ort_dynamic = _ort_default_dynamic(fp32_path, tmp / "ort_dynamic.onnx")
        add("ORT quantize_dynamic (defaults)", "onnxruntime", OnnxGraph.from_bytes(ort_dynamic),
            tmp / "ort_dynamic.onnx", _ort_kernels(ort_dynamic))

    fp32_bytes = rows[0].file_bytes
    header = ("| method | runtime | file bytes | vs fp32 | accuracy | agrees with fp32 | batch 1 median (p90) ms "
              "| batch 32 median (p90) ms | compute kernels |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lat = {b: f"{r.latency[b]['median_ms']:.3f} ({r.latency[b]['p90_ms']:.3f})" for b in (1, 32)}
        lines.append(
            f"| {r.method} | {r.runtime} | {r.file_bytes:,} | {r.file_bytes / fp32_bytes:.3f} | {r.accuracy:.2%} "
            f"| {r.agreement:.2%} | {lat[1]} | {lat[32]} | {r.kernels} |"
        )
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    report = (
        "# Quantization benchmark: lenet5 on digits\n\n"
        f"- machine: {_machine()}, {os.cpu_count()} logical cores; {threads} intra-op thread(s) for every runtime\n"
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"whole run {elapsed:.0f} s (`python benchmarks/quantization.py`)\n"
        f"- model: lenet5 trained with RECOMMENDED['lenet5'] (seed 0); accuracy on the {len(x_test)}-image "
        f"digits test split; calibration: first {CALIBRATION_SAMPLES} training images\n"
        "- file bytes: the file each result is saved as (.slim, .onnx, torch.save state_dict for torch.ao)\n"
        "- latency: torchslim.measure.measure_latency (warm-up, then torch.utils.benchmark blocks of >= 0.3 s); "
        "ONNX graphs run through OnnxGraph (an ORT session behind a torch module)\n"
        "- compute kernels: for ONNX Runtime, the compute nodes of the graph ORT executes after its own "
        "optimizations (QLinearConv/QGemm/DynamicQuantizeMatMul are int8 kernels); for torch, the conv/linear "
        "modules (int8 = torch.ao quantized modules)\n\n"
        f"{table}\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantization.md")
    args = parser.parse_args()
    print(run(args.threads, args.out))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

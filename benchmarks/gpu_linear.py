"""GPU weight-only low-bit linears on a Llama-3-8B-shaped SwiGLU MLP: torchslim's Triton kernels vs peers.

The MLP is 4096 -> 14336 -> 4096 (gate, up, down; no biases), bf16 activations, batch (tokens) 1, 4,
16 and 64. Rows, each built from the same random weights:
- bf16, ``torch.compile`` (the baseline every speedup refers to) and bf16 eager;
- torchslim ``IntQuant`` int4 group-128 (asymmetric and symmetric) and int8 per-channel: the packed
  ``.slim`` layers, whose forward runs ``torchslim.kernels.lowbit_linear`` on CUDA;
- PyTorch's tinygemm int4 group-128 (``torch._weight_int4pack_mm``), the strongest in-box int4 peer;
- torchao int8 / int4 weight-only configs, when torchao is importable (each guarded);
- 2:4 semi-structured sparsity (``torch.sparse.to_sparse_semi_structured``) compiled, so users see
  when it helps (it stores about 56% of the bf16 bytes; its error is pruning error, not rounding).

Each row is timed as a CUDA graph replay (no Python launch overhead; ``triton.testing.do_bench``
median with its L2 flush between runs) and, for reference, as plain eager calls. Reported: median
microseconds, achieved GB/s of the row's weight bytes (packed codes + scales + zero points), speedup
vs compiled bf16, and the relative error ``||y - y_fp32|| / ||y_fp32||`` against the fp32 MLP.

Usage: ``PYTHONPATH=src python benchmarks/gpu_linear.py --out DIR [--quick]`` (needs a CUDA GPU and
triton; writes ``DIR/gpu_linear.json`` and ``DIR/gpu_linear.md``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HIDDEN, INTERMEDIATE = 4096, 14336
TORCHAO_INT8 = ("Int8WeightOnlyConfig", "int8_weight_only")  # new name first, then the pre-0.10 factory
TORCHAO_INT4 = ("Int4WeightOnlyConfig", "int4_weight_only")


class SwiGLU(nn.Module):
    """Llama's MLP: ``down(silu(gate(x)) * up(x))`` with bias-free linears."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def tensor_bytes(value: torch.Tensor) -> int:
    """Bytes a (possibly subclassed, e.g. torchao or semi-structured) tensor holds."""
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor and type(value) is not nn.Parameter:
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, name)) for name in names if getattr(value, name) is not None)
    return value.numel() * value.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (weights, packed codes, scales, zero points)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())


# ---------------------------------------------------------------------------------------------- rows
def bf16_eager(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base)


def bf16_compiled(base: nn.Module, mode: str) -> nn.Module:
    model = copy.deepcopy(base)
    model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
    return model


def torchslim_int(base: nn.Module, bits: int, granularity: str, symmetric: bool) -> nn.Module:
    import torchslim as ts

    model = copy.deepcopy(base)
    ts.quantize_(model, ts.IntQuant(bits=bits, granularity=granularity, group_size=128, symmetric=symmetric))
    return model


class _TinyGemmLinear(nn.Module):
    """``torch._weight_int4pack_mm`` on asymmetric group-128 int4 (``(q - 8) * scale + zero``)."""

    def __init__(self, weight: torch.Tensor, group_size: int = 128, inner_k_tiles: int = 8) -> None:
        super().__init__()
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-6)
        zero = low + 8 * scale
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # torch >= 2.5 layout (as torchao packs it)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=2).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16))
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_zeros)
        return out.reshape(*x.shape[:-1], -1)


def tinygemm_int4(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for name in ("gate", "up", "down"):
        setattr(model, name, _TinyGemmLinear(getattr(model, name).weight.detach()))
    return model


def torchao_config(base: nn.Module, names: tuple[str, ...], compile_mode: str) -> nn.Module:
    quantization = importlib.import_module("torchao.quantization")
    config = None
    for name in names:
        factory = getattr(quantization, name, None)
        if factory is not None:
            config = factory()
            break
    if config is None:
        raise ImportError(f"torchao.quantization has none of {names}")
    model = copy.deepcopy(base)
    quantization.quantize_(model, config)
    model.forward = torch.compile(model.forward, mode=compile_mode, dynamic=False)
    return model


def semi_structured_24(base: nn.Module, compile_mode: str) -> nn.Module:
    from torch.sparse import to_sparse_semi_structured

    from torchslim.prune.unstructured import nm_mask

    model = copy.deepcopy(base)
    for name in ("gate", "up", "down"):
        linear = getattr(model, name)
        weight = linear.weight.detach()
        pruned = weight.masked_fill(~nm_mask(weight.abs(), 2, 4), 0)
        linear.weight = nn.Parameter(to_sparse_semi_structured(pruned), requires_grad=False)
    model.forward = torch.compile(model.forward, mode=compile_mode, dynamic=False)
    return model


# --------------------------------------------------------------------------------------------- timing
def time_graph(fn: Callable[[], torch.Tensor], rep_ms: int) -> float | None:
    """Median microseconds of one CUDA-graph replay of ``fn`` (None when it cannot be captured)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - some peers' ops are not capturable; eager timing still stands
        torch.cuda.synchronize()
        return None
    return 1000 * do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median")


def time_eager(fn: Callable[[], torch.Tensor], rep_ms: int) -> float:
    from triton.testing import do_bench

    return 1000 * do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm())


# ----------------------------------------------------------------------------------------------- main
def environment() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for module in ("triton", "torchao"):
        try:
            info[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - optional peers
            info[module] = None
    return info


def build_rows(quick: bool, compile_mode: str) -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
    rows = [
        ("bf16 torch.compile", lambda base: bf16_compiled(base, compile_mode)),
        ("bf16 eager", bf16_eager),
        ("torchslim int4 g128", lambda base: torchslim_int(base, 4, "group", False)),
        ("torchslim int8 channel", lambda base: torchslim_int(base, 8, "channel", False)),
    ]
    if quick:
        return rows
    return rows + [
        ("torchslim int4 g128 symmetric", lambda base: torchslim_int(base, 4, "group", True)),
        ("aten tinygemm int4 g128", tinygemm_int4),
        ("torchao int8 weight-only", lambda b: torchao_config(b, TORCHAO_INT8, compile_mode)),
        ("torchao int4 weight-only", lambda b: torchao_config(b, TORCHAO_INT4, compile_mode)),
        ("2:4 sparse bf16 torch.compile", lambda base: semi_structured_24(base, compile_mode)),
    ]  # fmt: skip


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# GPU low-bit linears: SwiGLU {result['shape']} (bf16 activations)",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, torchao {env['torchao']}, {env['date']}. "
        "Median microseconds of a CUDA-graph replay (eager calls in brackets); GB/s of the row's weight bytes; "
        "speedup vs bf16 torch.compile in the same run; error vs the fp32 MLP.",
        "",
        "| row | weight MB | batch | us (eager us) | GB/s | speedup | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | | | failed: {row['error']} | | | |")
            continue
        for batch, t in row["timings"].items():
            graph = "n/a" if t["graph_us"] is None else f"{t['graph_us']:.1f}"
            speedup = "" if t.get("speedup") is None else f"{t['speedup']:.2f}x"
            lines.append(
                f"| {row['name']} | {row['weight_bytes'] / 1e6:.1f} | {batch} | {graph} ({t['eager_us']:.1f}) | "
                f"{t['gbps']:.0f} | {speedup} | {t['rel_error']:.2e} |"
            )
    return "\n".join(lines) + "\n"


def run(quick: bool, batches: list[int], compile_mode: str, rep_ms: int) -> dict:
    torch.manual_seed(0)
    base32 = SwiGLU(HIDDEN, INTERMEDIATE).cuda().eval()
    with torch.no_grad():
        for linear in (base32.gate, base32.up, base32.down):
            linear.weight.normal_(0, 0.02)
    base = copy.deepcopy(base32).to(torch.bfloat16)
    inputs = {b: torch.randn(b, HIDDEN, device="cuda").to(torch.bfloat16) for b in batches}
    with torch.inference_mode():
        references = {b: base32(x.float()) for b, x in inputs.items()}
    result = {"environment": environment(), "shape": f"{HIDDEN}->{INTERMEDIATE}->{HIDDEN}", "rows": []}
    baseline: dict[int, float] = {}
    for name, build in build_rows(quick, compile_mode):
        started = time.time()
        try:
            with torch.inference_mode():
                model = build(base)
                row = {"name": name, "weight_bytes": weight_bytes(model), "timings": {}}
                for batch, x in inputs.items():
                    y = model(x)
                    graph_us = time_graph(lambda m=model, x=x: m(x), rep_ms)
                    eager_us = time_eager(lambda m=model, x=x: m(x), rep_ms)
                    us = graph_us if graph_us is not None else eager_us
                    if name == "bf16 torch.compile":
                        baseline[batch] = us
                    row["timings"][batch] = {
                        "graph_us": graph_us,
                        "eager_us": eager_us,
                        "gbps": row["weight_bytes"] / (us * 1e-6) / 1e9,
                        "speedup": baseline[batch] / us if batch in baseline else None,
                        "rel_error": relative_error(y, references[batch]),
                    }
            del model
        except Exception as exc:  # noqa: BLE001 - one peer failing must not lose the other rows
            traceback.print_exc()
            row = {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        row["build_and_time_s"] = round(time.time() - started, 1)
        result["rows"].append(row)
        print(summary(row), flush=True)
        torch.cuda.empty_cache()
    return result


def summary(row: dict) -> str:
    if "error" in row:
        return f"{row['name']:32s} failed: {row['error']}"
    parts = []
    for batch, t in row["timings"].items():
        speedup = "" if t["speedup"] is None else f"{t['speedup']:.2f}x "
        us = t["graph_us"] if t["graph_us"] is not None else t["eager_us"]
        parts.append(f"bs{batch}: {us:.1f}us {t['gbps']:.0f}GB/s {speedup}err {t['rel_error']:.1e}")
    return f"{row['name']:32s} {row['weight_bytes'] / 1e6:7.1f}MB  " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_linear.json and gpu_linear.md")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 16, four rows, default compile mode")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,16,64)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default max-autotune-no-cudagraphs)")
    parser.add_argument("--rep-ms", type=int, default=None, help="do_bench repetition time per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_linear.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("error: benchmarks/gpu_linear.py needs triton: pip install 'torchslim[gpu]'", file=sys.stderr)
        return 2
    batches = [int(b) for b in (args.batches or ("1,16" if args.quick else "1,4,16,64")).split(",")]
    mode = args.compile_mode or ("default" if args.quick else "max-autotune-no-cudagraphs")
    result = run(args.quick, batches, mode, args.rep_ms or (50 if args.quick else 200))
    from torchslim.fileio import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu_linear.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "gpu_linear.md", markdown(result))
    print(f"wrote {args.out / 'gpu_linear.json'} and {args.out / 'gpu_linear.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

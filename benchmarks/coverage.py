"""Architecture coverage: each torchslim operation on >= 25 architectures, ✓ or ✗ with the error a user sees.

Architectures (``torchslim.coverage.zoo``, random weights from ``transformers`` configs, nothing downloaded):
encoders, decoders, encoder-decoders, vision and audio models from Hugging Face, torchslim's own CNNs and user-style
modules. torchvision is not used: its PyPI wheel is a CUDA build that does not load beside the CPU torch here, so
the vision rows are the Hugging Face vision models. Operations and their checks: ``torchslim.coverage.runner``.

Usage: ``python benchmarks/coverage.py [--archs bert,gpt2] [--ops int4,onnx] [--threads 2]
[--out benchmarks/results/coverage.md]`` (also writes the ``.json`` beside it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

# benchmarks/transformers.py would shadow the transformers package when this script's folder is on sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from torchslim.coverage.runner import OPERATIONS, run_table, to_json, to_markdown  # noqa: E402
from torchslim.coverage.zoo import ARCHITECTURES  # noqa: E402
from torchslim.fileio import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architecture names")
    parser.add_argument("--ops", default=",".join(OPERATIONS), help="comma-separated operation names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/coverage.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    archs = [a for a in args.archs.split(",") if a]
    ops = [o for o in args.ops.split(",") if o]
    start = time.perf_counter()

    def progress(arch: str, op: str, cell) -> None:
        print(f"{arch:20s} {op:13s} {cell.status:6s} {cell.seconds:6.1f}s {cell.message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="torchslim-coverage-") as workdir:
        table = run_table(archs, ops, workdir=workdir, on_cell=progress)
    seconds = time.perf_counter() - start
    command = " ".join(["python benchmarks/coverage.py", *sys.argv[1:]])
    header = (
        f"# Architecture coverage\n\n`{command}`, {datetime.date.today()}, {platform.machine()} "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}: {len(archs)} architectures x {len(ops)} "
        f"operations in {seconds:.0f} s (one run).\n\n")
    out = Path(args.out)
    atomic_write_text(out, header + to_markdown(table))
    atomic_write_text(out.with_suffix(".json"), json.dumps({"seconds": seconds, "table": to_json(table)}, indent=1))
    print(to_markdown(table))
    print(f"wrote {out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()

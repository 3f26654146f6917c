"""Does a sparse kernel beat the dense one on CPU? CSR ``torch.sparse.mm`` vs ``F.linear`` per shape and sparsity.

torchslim's fast paths use a sparse kernel only where it is measured faster than dense; this script is that
measurement for the shapes our models have (LeNet-5's 500 x 800 fully connected layer, LeNet-300-100's 300 x 784,
an LLM's 1536 x 576) at the sparsities pruning reaches. Median of ``torch.utils.benchmark`` runs, one run,
``--threads`` threads. Usage: ``python benchmarks/sparse_cpu.py [--threads 2]``; writes
``benchmarks/results/sparse_cpu.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

SHAPES = [(500, 800), (300, 784), (1536, 576)]
SPARSITIES = [0.5, 0.9, 0.95, 0.98]
BATCHES = [1, 32]


def median_ms(stmt: str, env: dict, threads: int) -> float:
    return Timer(stmt=stmt, globals=env, num_threads=threads).blocked_autorange(min_run_time=0.3).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    lines = [
        "# Sparse vs dense Linear on CPU",
        "",
        f"`python benchmarks/sparse_cpu.py --threads {args.threads}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one run, torch {torch.__version__}. "
        "Speedup = dense `F.linear` ms / CSR `torch.sparse.mm` ms (>1: sparse pays).",
        "",
        "| weight | sparsity | batch | dense ms | CSR ms | sparse speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for out_features, in_features in SHAPES:
        for sparsity in SPARSITIES:
            weight = torch.randn(out_features, in_features, generator=generator)
            weight[torch.rand(weight.shape, generator=generator) < sparsity] = 0.0
            csr = weight.to_sparse_csr()
            for batch in BATCHES:
                x = torch.randn(batch, in_features, generator=generator)
                env = {"F": F, "torch": torch, "x": x, "w": weight, "csr": csr, "xt": x.t().contiguous()}
                dense = median_ms("F.linear(x, w)", env, args.threads)
                sparse = median_ms("torch.sparse.mm(csr, xt)", env, args.threads)
                lines.append(f"| {out_features} x {in_features} | {sparsity:.0%} | {batch} | {dense:.4f} | "
                             f"{sparse:.4f} | {dense / sparse:.2f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Pruning side by side on one trained lenet5: torchslim vs ``torch.nn.utils.prune`` (the seed's tool).

One run trains lenet5 on digits (``RECOMMENDED["lenet5"]``, seed 0), then prunes that same model each way with
the same fine-tuning budget (``FINETUNE``: the same optimizer, learning rate, augmentation and epochs, through the
same training loop) and measures each result the same way: bytes of the file it is saved as (its native format:
``.slim`` for torchslim, ``torch.save`` of the state dict after ``prune.remove`` for torch.nn.utils.prune, plus the
same state dict with sparse COO weights as the best that tool's users can do by hand), top-1 accuracy on the digits
test split, and forward latency (median and p90, ``torchslim.measure.measure_latency``).

Rows:
- fp32 dense;
- torchslim ``MagnitudePruning(scope="global", amount=0.9)`` + fine-tune (``prune_with_schedule``, one-shot);
- ``torch.nn.utils.prune.global_unstructured(L1Unstructured, amount=0.9)`` + the same fine-tune;
- torchslim 90% + ``IntQuant(bits=4)`` on top;
- torchslim ``ChannelPruning(amount=0.5)`` (physical channel removal) + the same fine-tune, when
  ``torchslim.prune.structural`` is present.

Usage: ``python benchmarks/pruning.py [--threads 1] [--out benchmarks/results/pruning.md]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import torchslim as ts
from torchslim.fileio import atomic_write_text
from torchslim.measure import count_macs, measure_latency, parameter_stats
from torchslim.prune import MagnitudePruning, layer_sparsity
from torchslim.prune.schedule import PruneSchedule, prune_with_schedule
from torchslim.quantize import IntQuant, quantize_
from torchslim.train import RECOMMENDED, evaluate, train

SPARSITY = 0.9
CHANNELS = 0.5
FINETUNE = RECOMMENDED["lenet5"].replace(epochs=5)  # the budget every method gets


@dataclasses.dataclass
class Row:
    method: str
    file: str
    file_bytes: int
    accuracy: float
    parameters: int
    nonzero: int
    macs: int
    latency: dict


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return model


def _torch_prune(model: nn.Module, data) -> nn.Module:
    """The seed's tool: global L1 pruning of every conv/linear weight, fine-tune with masks, then prune.remove."""
    pruned = copy.deepcopy(model)
    params = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)
    train(pruned, data.train, FINETUNE, progress=False)
    for module, name in params:
        torch_prune.remove(module, name)
    return pruned.eval()


def _channel_prune(model: nn.Module, data) -> tuple[nn.Module, str]:
    from torchslim.prune import ChannelPruning

    pruned = copy.deepcopy(model)
    config = ChannelPruning(amount=CHANNELS)
    ts.prune_(pruned, config, example_inputs=data.example_inputs(1))
    train(pruned, data.train, FINETUNE, progress=False)
    return pruned.eval(), f"ChannelPruning(amount={CHANNELS})"


def run(threads: int, out_path: Path) -> str:
    """Train once, prune every way, measure, and return (and write) the Markdown report."""
    started = time.perf_counter()
    data = ts.load_data("digits")
    torch.manual_seed(0)
    model = ts.create_model("lenet5")
    train(model, data.train, RECOMMENDED["lenet5"], progress=False)
    model.eval()
    example = data.example_inputs(1)
    rows: list[Row] = []

    def add(method: str, module: nn.Module, path: Path) -> None:
        stats = parameter_stats(module)
        latency = measure_latency(module, example, (1, 32), num_threads=threads, min_run_time=0.3)
        rows.append(Row(method, path.suffix, path.stat().st_size, evaluate(module, data.test), stats["parameters"],
                        stats["nonzero"], count_macs(module, example), latency))
        print(f"  {method}: done", flush=True)

    with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as name:
        tmp = Path(name)
        add("fp32 dense", model, ts.save(model, tmp / "fp32.slim"))

        sparse = copy.deepcopy(model)
        prune_with_schedule(sparse, MagnitudePruning(scope="global", amount=SPARSITY),
                            PruneSchedule(finetune_epochs=FINETUNE.epochs), data, train_config=FINETUNE)
        add(f"torchslim MagnitudePruning(global, amount={SPARSITY}) + fine-tune", sparse,
            ts.save(sparse, tmp / "sparse.slim"))

        seed_tool = _torch_prune(model, data)
        dense_path = tmp / "torch_prune.pt"
        torch.save(seed_tool.state_dict(), dense_path)
        add(f"torch.nn.utils.prune global L1 ({SPARSITY}) + fine-tune, torch.save(state_dict)", seed_tool, dense_path)
        coo_path = tmp / "torch_prune_coo.pt"
        torch.save({k: v.to_sparse() if k.endswith("weight") else v for k, v in seed_tool.state_dict().items()},
                   coo_path)
        add("torch.nn.utils.prune, same model, weights saved as sparse COO by hand", seed_tool, coo_path)

        packed = copy.deepcopy(sparse)
        quantize_(packed, IntQuant(bits=4))
        add(f"torchslim {SPARSITY:.0%} sparse + IntQuant(bits=4)", packed, ts.save(packed, tmp / "sparse4.slim"))

        channels, label = _channel_prune(model, data)
        add(f"torchslim {label} + fine-tune (channels removed)", channels, ts.save(channels, tmp / "chan.slim"))

    sparsity = layer_sparsity(sparse)
    fp32 = rows[0]
    header = ("| method | file | file bytes | vs fp32 | parameters (nonzero) | MACs | accuracy "
              "| batch 1 median (p90) ms | batch 32 median (p90) ms |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lat = {b: f"{r.latency[b]['median_ms']:.3f} ({r.latency[b]['p90_ms']:.3f})" for b in (1, 32)}
        lines.append(
            f"| {r.method} | {r.file} | {r.file_bytes:,} | {r.file_bytes / fp32.file_bytes:.3f} "
            f"| {r.parameters:,} ({r.nonzero:,}) | {r.macs:,} | {r.accuracy:.2%} | {lat[1]} | {lat[32]} |"
        )
    table = "\n".join(lines)
    per_layer = ", ".join(f"{n}: {row['sparsity']:.1%}" for n, row in sparsity.items())
    elapsed = time.perf_counter() - started
    report = (
        "# Pruning benchmark: lenet5 on digits\n\n"
        f"- machine: {_machine()}, {os.cpu_count()} logical cores; {threads} intra-op thread(s) for latency\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"whole run {elapsed:.0f} s (`python benchmarks/pruning.py`)\n"
        "- model: lenet5 trained with RECOMMENDED['lenet5'] (seed 0); accuracy on the 360-image digits test split\n"
        f"- fine-tuning, identical for every method: torchslim.train.train with {FINETUNE.epochs} epochs, "
        f"{FINETUNE.optimizer} lr {FINETUNE.lr:g}, {FINETUNE.scheduler} schedule, +-{FINETUNE.augment_shift} px shifts"
        " (masks attached while training, removed afterwards)\n"
        f"- torchslim 90% per-layer sparsity (global threshold): {per_layer}\n"
        "- file bytes: the file each result is saved as (.slim; torch.save of the state dict for torch.nn.utils.prune,"
        " dense after prune.remove, or with weights converted to sparse COO by hand)\n"
        "- latency: torchslim.measure.measure_latency (warm-up, then torch.utils.benchmark blocks of >= 0.3 s), torch"
        " eager; unstructured zeros are dense math in eager PyTorch, so only channel removal can be faster\n\n"
        f"{table}\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pruning.md")
    args = parser.parse_args()
    print(run(args.threads, args.out))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""Structural (channel) pruning: dense vs 50%-channel-pruned lenet5 and resnet, size, MACs, accuracy, CPU latency.

One run trains each model on digits (``RECOMMENDED[name]``, seed 0), prunes a copy with
``ChannelPruning(amount=0.5)`` (L1 importance, per layer: every prunable width halved, the classifier's
outputs kept), fine-tunes it briefly (``RECOMMENDED[name]`` with fewer epochs), and measures both the
same way: parameters, MACs of one sample (``torchslim.measure.count_macs``), ``.slim`` file bytes,
top-1 accuracy on the digits test split, and forward latency in torch eager on CPU
(``torchslim.measure.measure_latency``: warm-up, then medians over ``torch.utils.benchmark`` blocks),
at batch 1 and 32. Dense and pruned are timed in the same process, alternately, and each is timed
twice; the lower of its two medians is reported (less exposure to a noisy neighbour).

Usage: ``python benchmarks/pruning_structural.py [--threads 1] [--out benchmarks/results/pruning_structural.md]``
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

import torchslim as ts
from torchslim.fileio import atomic_write_text
from torchslim.measure import count_macs, measure_latency, parameter_stats
from torchslim.prune.structural import ChannelPruning, prune_channels_
from torchslim.train import RECOMMENDED, evaluate, train

MODELS = ("lenet5", "resnet")
FINETUNE_EPOCHS = {"lenet5": 5, "resnet": 3}
BATCHES = (1, 32)


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    params: int
    macs: int
    file_bytes: int
    accuracy: float
    latency: dict[int, float]  # batch -> median ms
    widths: str


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return model


def _widths(model: nn.Module) -> str:
    widths = [
        str(getattr(m, "out_channels", getattr(m, "out_features", "?")))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    return "-".join(widths)


def _latency(models: list[nn.Module], example: torch.Tensor, threads: int) -> list[dict[int, float]]:
    """Median ms per batch size for each model; models alternate, two rounds, the lower median kept."""
    best: list[dict[int, float]] = [{b: float("inf") for b in BATCHES} for _ in models]
    for _ in range(2):
        for index, model in enumerate(models):
            result = measure_latency(model, example, BATCHES, num_threads=threads, min_run_time=0.5)
            for batch in BATCHES:
                best[index][batch] = min(best[index][batch], result[batch]["median_ms"])
    return best


def run(threads: int, out_path: Path) -> str:
    """Train, prune, fine-tune, measure; return (and write) the Markdown report."""
    started = time.perf_counter()
    data = ts.load_data("digits")
    torch.set_num_threads(threads)
    example = data.example_inputs(1)
    rows: list[Row] = []
    reports = {}
    with tempfile.TemporaryDirectory(prefix="torchslim-bench-") as name:
        tmp = Path(name)
        for model_name in MODELS:
            torch.manual_seed(0)
            dense = ts.create_model(model_name)
            train(dense, data.train, RECOMMENDED[model_name])
            pruned = copy.deepcopy(dense)
            reports[model_name] = prune_channels_(pruned, ChannelPruning(amount=0.5), data.example_inputs(8))
            epochs = FINETUNE_EPOCHS[model_name]
            train(pruned, data.train, dataclasses.replace(RECOMMENDED[model_name], epochs=epochs))
            dense.eval()
            pruned.eval()
            latency = _latency([dense, pruned], example, threads)
            variants = (("dense", dense), (f"50% channels pruned + {epochs} epochs fine-tune", pruned))
            for (variant, model), lat in zip(variants, latency, strict=True):
                path = ts.save(model, tmp / f"{model_name}-{len(rows)}.slim")
                rows.append(
                    Row(
                        model_name,
                        variant,
                        parameter_stats(model)["parameters"],
                        count_macs(model, example),
                        path.stat().st_size,
                        evaluate(model, data.test),
                        lat,
                        _widths(model),
                    )
                )
            print(f"  {model_name}: done", flush=True)

    header = (
        "| model | variant | parameters | vs dense | MACs / sample | vs dense | .slim bytes | accuracy "
        "| batch 1 median ms | speedup | batch 32 median ms | speedup | conv/linear output widths |"
    )
    lines = [header, "|" + "---|" * 13]
    dense_row: Row | None = None
    for r in rows:
        dense_row = r if r.variant == "dense" else dense_row
        assert dense_row is not None
        lines.append(
            f"| {r.model} | {r.variant} | {r.params:,} | {r.params / dense_row.params:.3f} | {r.macs:,} "
            f"| {r.macs / dense_row.macs:.3f} | {r.file_bytes:,} | {r.accuracy:.2%} | {r.latency[1]:.3f} "
            f"| {dense_row.latency[1] / r.latency[1]:.2f}x | {r.latency[32]:.3f} "
            f"| {dense_row.latency[32] / r.latency[32]:.2f}x | {r.widths} |"
        )
    table = "\n".join(lines)
    elapsed = time.perf_counter() - started
    import torch_pruning

    report = (
        "# Structural pruning benchmark: 50% channels, lenet5 and resnet on digits\n\n"
        f"- machine: {_machine()}, {os.cpu_count()} logical cores; {threads} intra-op thread(s)\n"
        f"- torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, "
        f"Python {platform.python_version()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"whole run {elapsed:.0f} s (`python benchmarks/pruning_structural.py --threads {threads}`)\n"
        "- dense: trained with RECOMMENDED[model] (seed 0); pruned: a copy pruned with "
        "`ChannelPruning(amount=0.5)` (L1, per layer; classifier outputs kept), then fine-tuned with "
        f"RECOMMENDED[model] for {', '.join(f'{k}: {v}' for k, v in FINETUNE_EPOCHS.items())} epochs; accuracy on "
        f"the {len(data.test)}-image digits test split\n"
        "- MACs: torchslim.measure.count_macs (one sample); parameters: torchslim.measure.parameter_stats\n"
        "- latency: torch eager, torchslim.measure.measure_latency (warm-up, then torch.utils.benchmark blocks of "
        ">= 0.5 s), dense and pruned alternated, lower of two medians; speedup = dense median / pruned median\n\n"
        f"{table}\n"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pruning_structural.md")
    args = parser.parse_args()
    print(run(args.threads, args.out))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

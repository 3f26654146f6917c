"""Headline: LeNet-300-100 and LeNet-5 on digits compressed by the budget planner vs the seed's own stack.

For each model, in one run: train fp32 (recommended settings, seed 0), save it as ``.slim``; run the planner
(``--max-accuracy-drop 0.5 --target size``) and measure the chosen ``.slim``; and the seed's stack on the same trained
model: ``torch.nn.utils.prune`` global L1 unstructured pruning (90%, fine-tuned), then ``torch.ao.quantization`` dynamic
int8 of the Linear layers, saved with ``torch.save`` of the quantized model's state dict (what that stack can save).
Accuracy is on the digits test split (360 images; one image = 0.28 points). Deep Compression's published ratios
(Han et al. 2016, Table 1: LeNet-300-100 40x, LeNet-5 39x) are quoted beside, on MNIST.

Usage: ``python benchmarks/headline.py [--time-budget 600] [--out benchmarks/results/headline.md]``
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import torchslim as ts
from torchslim.pipeline.planner import PlannerConfig, plan
from torchslim.train import RECOMMENDED

PUBLISHED = {"lenet300": "40x (LeNet-300-100, MNIST)", "lenet5": "39x (LeNet-5, MNIST)"}


def seed_stack(name, model, splits) -> tuple[int, float]:
    """torch.nn.utils.prune (global L1, 90%, fine-tuned) + torch.ao dynamic int8; bytes of torch.save(state_dict)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.9)
    ts.train(model, splits.train, RECOMMENDED[name].replace(epochs=5, lr=5e-4), progress=False)
    for module, name in layers:
        prune.remove(module, name)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    return len(buffer.getvalue()), ts.evaluate(quantized, splits.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=600.0, help="planner seconds per model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "headline.md")
    parser.add_argument("--models", default="lenet300,lenet5")
    args = parser.parse_args()
    splits = ts.load_data("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = ts.create_model(name)
            ts.train(model, splits.train, RECOMMENDED[name], progress=False)
            model.eval()
            fp32_path = Path(tmp) / f"{name}.slim"
            ts.save(model, fp32_path)
            fp32_bytes, fp32_acc = os.path.getsize(fp32_path), ts.evaluate(model, splits.test)
            started = time.perf_counter()
            result = plan(model, splits, PlannerConfig(max_accuracy_drop=0.5, time_budget=args.time_budget),
                          progress=print)
            seconds = time.perf_counter() - started
            planned = ("-", "-", "none met the budget")
            if result.model is not None:
                path = Path(tmp) / f"{name}-planned.slim"
                ts.save(result.model, path)
                planned = (os.path.getsize(path), ts.evaluate(result.model, splits.test),
                           result.points[result.chosen]["label"])
            seed_bytes, seed_acc = seed_stack(name, model, splits)
            rows.append((name, fp32_bytes, fp32_acc, planned, seconds, seed_bytes, seed_acc))
    lines = ["# Headline: planner vs the seed's stack (digits, one run)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: `python benchmarks/headline.py "
             f"--time-budget {args.time_budget:g}`. Accuracy: digits test split (360 images).", "",
             "| model | fp32 .slim | fp32 acc | planner .slim | ratio | acc | drop (pts) | planner choice | search s "
             "| seed stack bytes | ratio | acc | Deep Compression |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for name, fb, fa, (pb, pa, label), seconds, sb, sa in rows:
        ratio = "-" if pb == "-" else f"{fb / pb:.1f}x"
        acc = "-" if pb == "-" else f"{pa:.2%}"
        drop = "-" if pb == "-" else f"{100 * (fa - pa):.2f}"
        lines.append(f"| {name} | {fb:,} | {fa:.2%} | {pb if pb == '-' else f'{pb:,}'} | {ratio} | {acc} | {drop} "
                     f"| {label} | {seconds:.0f} | {sb:,} | {fb / sb:.1f}x | {sa:.2%} | {PUBLISHED[name]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from torchslim.fileio import atomic_write_text

    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()

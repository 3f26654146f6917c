"""Headline: LeNet-300-100 and LeNet-5 on digits compressed by the budget planner vs the seed's own stack.

For each model, in one run: train fp32 (recommended settings, seed 0) on the planner's fine-tuning part of the
training split (``holdout_split``: the planner's held-out 20% is never seen by the model, so the planner's budget is
judged on unseen images) and save it as ``.slim``; train the seed's larger ResNet-style teacher (``resnet``,
``RECOMMENDED["resnet"]``) on the same part; run the planner (default ``max_accuracy_drop=0.5``, ``target="size"``,
its distilled candidates learning from that teacher: ``torchslim compress --teacher``) and measure the chosen
``.slim``; and the seed's stack on the same trained model: ``torch.nn.utils.prune`` global L1
unstructured pruning (90%, fine-tuned on the same images), then ``torch.ao.quantization`` dynamic int8 of the Linear
layers, saved with ``torch.save`` of the quantized model's state dict (what that stack can save). Accuracy is on the
digits test split (360 images; one image = 0.28 points). Deep Compression's published ratios (Han et al. 2016,
Table 1: LeNet-300-100 40x, LeNet-5 39x) are quoted beside, on MNIST.

``--target latency`` runs the planner for batch-1 latency instead of size (it ranks candidates by the route
``torchslim deploy`` picks) and adds a latency table: the chosen ``.slim`` deployed (every route checked on the test
split, accuracy within 0.5 points of the planned model) and timed against the fp32 model in PyTorch eager in the
same deploy run, and, for comparison, the fp32 model's own fastest deployed route (what the runtime alone gives).

Usage: ``python benchmarks/headline.py [--time-budget 600] [--models lenet300,lenet5] [--target size|latency]
[--out FILE.md]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import torchslim as ts
from torchslim.deployment import deploy
from torchslim.pipeline.planner import PlannerConfig, holdout_split, plan
from torchslim.train import RECOMMENDED

PUBLISHED = {"lenet300": "40x (LeNet-300-100, MNIST)", "lenet5": "39x (LeNet-5, MNIST)"}


def seed_stack(name: str, model: torch.nn.Module, fit, test) -> tuple[int, float]:
    """torch.nn.utils.prune (global L1, 90%, fine-tuned) + torch.ao dynamic int8; bytes of torch.save(state_dict)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.9)
    ts.train(model, fit, RECOMMENDED[name].replace(epochs=5, lr=5e-4), progress=False)
    for module, attribute in layers:
        prune.remove(module, attribute)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    return len(buffer.getvalue()), ts.evaluate(quantized, test)


def run_model(name: str, splits, fit, config: PlannerConfig, tmp: Path, teacher: torch.nn.Module) -> dict:
    """Train ``name`` on the planner's fine-tuning part ``fit``, plan it, run the seed's stack; bytes and accuracy."""
    torch.manual_seed(0)
    model = ts.create_model(name)
    ts.train(model, fit, RECOMMENDED[name], progress=False)
    model.eval()
    fp32_path = tmp / f"{name}.slim"
    ts.save(model, fp32_path)
    row = {"name": name, "fp32_bytes": os.path.getsize(fp32_path), "fp32_acc": ts.evaluate(model, splits.test)}
    started = time.perf_counter()
    result = plan(model, splits, config, progress=lambda line: print(f"  {name}: {line}", flush=True),
                  teacher=teacher)
    row.update(seconds=time.perf_counter() - started, holdout_acc=result.baseline_accuracy, explored=len(result.points),
               stopped_early=result.stopped_early, planned=None)
    if result.model is not None:
        path = tmp / f"{name}-planned.slim"
        ts.save(result.model, path)
        reloaded = ts.load(path)  # measured as a user gets it
        row["planned"] = (os.path.getsize(path), ts.evaluate(reloaded, splits.test),
                          result.points[result.chosen]["label"], result.points[result.chosen]["accuracy"])
        if config.target == "latency":
            row["deployed"] = deploy(path, None, data=splits, reference=model, batch_sizes=(1, 32))
            row["fp32_deployed"] = deploy(fp32_path, None, data=splits, reference=model, batch_sizes=(1, 32))
    row["seed"] = seed_stack(name, model, fit, splits.test)
    return row


def render(rows: list[dict], args, config: PlannerConfig, teacher_acc: float) -> str:
    amounts = ",".join(f"{v:g}" for v in config.channel_amounts)
    sparsities = ",".join(f"{v:g}" for v in config.sparsities)
    lines = [f"# Headline: planner (target {config.target}) vs the seed's stack (digits, one run)", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.processor() or platform.machine()} with {os.cpu_count()} logical cores; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: `python benchmarks/headline.py "
             f"--time-budget {args.time_budget:g} --target {config.target} --max-accuracy-drop "
             f"{config.max_accuracy_drop:g} --recovery-epochs {config.recovery_epochs} --qat-epochs "
             f"{config.qat_epochs} --channel-amounts {amounts} --sparsities {sparsities}`. Baselines trained on the "
             "planner's fine-tuning part of the "
             f"training split ({1 - config.holdout_fraction:.0%}, seed {config.seed}); the planner decides on the "
             f"other {config.holdout_fraction:.0%} (unseen by the baseline) with budget {config.max_accuracy_drop} "
             f"points less a margin of {config.margin_samples} held-out image; its distilled candidates learn from "
             f"a resnet teacher trained on the same 80% ({teacher_acc:.2%} on the test split). Accuracy: digits "
             "test split (360 "
             "images, 1 image = 0.28 points). Bytes: the `.slim` file (planner) or `torch.save` of the state dict "
             "(seed stack); ratios against the fp32 `.slim`.", "",
             "| model | fp32 .slim | fp32 acc | planner .slim | ratio | acc | drop (pts) | planner choice | held-out "
             "| search s | seed stack bytes | ratio | acc | drop (pts) | Deep Compression |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        fb, fa = r["fp32_bytes"], r["fp32_acc"]
        if r["planned"] is None:
            planned = "| - | - | - | - | none met the budget | - "
        else:
            pb, pa, label, held = r["planned"]
            planned = (f"| {pb:,} | {fb / pb:.1f}x | {pa:.2%} | {100 * (fa - pa):.2f} | {label} | "
                       f"{held:.2%} (input {r['holdout_acc']:.2%}) ")
        sb, sa = r["seed"]
        lines.append(f"| {r['name']} | {fb:,} | {fa:.2%} {planned}| {r['seconds']:.0f}"
                     f"{' (budget spent)' if r['stopped_early'] else ''} | {sb:,} | {fb / sb:.1f}x | {sa:.2%} | "
                     f"{100 * (fa - sa):.2f} | {PUBLISHED.get(r['name'], '-')} |")
    deployed = [r for r in rows if r.get("deployed")]
    if deployed:
        lines += ["", "Latency on the deployed route (`torchslim deploy`: every route checked on the test split, "
                  "timed in 5 interleaved rounds against the fp32 model in PyTorch eager in the same run; speedup = "
                  "fp32 eager ms / route ms):", "",
                  "| model | planner choice | deployed route | fp32 eager b1 ms | route b1 ms | speedup b1 | "
                  "speedup b32 | fp32 model's own best route | its speedup b1 | its speedup b32 |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in deployed:
            best, own = r["deployed"].best, r["fp32_deployed"].best
            lines.append(f"| {r['name']} | {r['planned'][2]} | {best.name} | {r['deployed'].baseline_ms[1]:.3f} | "
                         f"{best.latency_ms[1]:.3f} | **{best.speedup[1]:.2f}x** | {best.speedup[32]:.2f}x | "
                         f"{own.name} | {own.speedup[1]:.2f}x | {own.speedup[32]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=600.0, help="planner seconds per model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "headline.md")
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--target", default="size", choices=("size", "latency"), help="PlannerConfig.target")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.5, help="PlannerConfig.max_accuracy_drop")
    parser.add_argument("--recovery-epochs", type=int, default=PlannerConfig.recovery_epochs,
                        help="PlannerConfig.recovery_epochs")
    parser.add_argument("--qat-epochs", type=int, default=PlannerConfig.qat_epochs, help="PlannerConfig.qat_epochs")
    parser.add_argument("--channel-amounts", default=",".join(map(str, PlannerConfig.channel_amounts)),
                        help="PlannerConfig.channel_amounts, comma-separated")
    parser.add_argument("--sparsities", default=",".join(map(str, PlannerConfig.sparsities)),
                        help="PlannerConfig.sparsities, comma-separated")
    args = parser.parse_args()
    from torchslim.fileio import atomic_write_text

    splits = ts.load_data("digits")
    config = PlannerConfig(max_accuracy_drop=args.max_accuracy_drop, target=args.target, time_budget=args.time_budget,
                           recovery_epochs=args.recovery_epochs, qat_epochs=args.qat_epochs,
                           channel_amounts=tuple(float(v) for v in args.channel_amounts.split(",")),
                           sparsities=tuple(float(v) for v in args.sparsities.split(",")))
    fit, _holdout = holdout_split(splits.train, fraction=config.holdout_fraction, seed=config.seed)
    torch.manual_seed(0)
    teacher = ts.create_model("resnet")
    ts.train(teacher, fit, RECOMMENDED["resnet"], progress=False)
    teacher.eval()
    teacher_acc = ts.evaluate(teacher, splits.test)
    print(f"teacher resnet: {teacher_acc:.2%} on the test split", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(run_model(name, splits, fit, config, Path(tmp), teacher))
            text = render(rows, args, config, teacher_acc)
            print(text, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, text)  # after each model, so an interrupted run keeps what it measured


if __name__ == "__main__":
    main()

"""Knowledge distillation on digits: the ResNet teacher, a small student alone vs distilled, and data-free students.

One run, Hinton et al. (2015) style (errors on the 360-image digits test split):

1. teacher: ``resnet`` (2.4M parameters, BatchNorm) trained with ``RECOMMENDED["resnet"]`` (+-2 px shifts);
2. student alone vs distilled: the same student (``student_cnn`` width 3, identical init), the same data order, the same
   epochs and optimizer (``STUDENT``, no augmentation: the transfer set is the training set without translations,
   as in Hinton's MNIST experiment); the distilled one uses ``KD(temperature=2, alpha=0.9, cache_logits=True)``.
   Five student seeds on the full training set (150 epochs), three on 5 labelled images a class;
3. simulated distillation, no real training labels: ``bn-inversion`` (no real image at all), ``mixup`` of 20
   unlabelled training images, and ``noise`` (pure Gaussian inputs); the student (``lenet5``, the seed's 28x28 ->
   10 model) learns only from the teacher, which scores every randomly shifted synthetic batch live.

Usage: ``python benchmarks/distillation.py [--out benchmarks/results/distillation.md]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import torchslim as ts
from torchslim.distill import KD, SyntheticData, distill
from torchslim.fileio import atomic_write_text
from torchslim.measure import parameter_stats
from torchslim.train import RECOMMENDED, TrainConfig, evaluate, train

STUDENT = ("student_cnn", {"width": 3})
STUDENT_CONFIG = TrainConfig(epochs=150, batch_size=32, lr=3e-3, scheduler="cosine")  # no shifts
FEW_CONFIG = TrainConfig(epochs=100, batch_size=25, lr=1e-3, scheduler="cosine")
KD_CONFIG = KD(temperature=2.0, alpha=0.9, cache_logits=True)
SEEDS = (1, 2, 3, 4, 5)
FEW_SEEDS = (1, 2, 3)
# shift_views=0: the live teacher labels the loop's randomly shifted batches (SYNTHETIC_CONFIG.augment_shift)
SYNTHETIC = {
    "bn-inversion": SyntheticData(method="bn-inversion", n=512, steps=100, batch_size=256, downsample=2, seed=0,
                                  shift_views=0),
    "mixup": SyntheticData(method="mixup", n=2048, seed=0, shift_views=0),
    "noise": SyntheticData(method="noise", n=2048, seed=0, shift_views=0),
}
SYNTHETIC_STUDENT = ("lenet5", {})
# the live teacher labels each shifted view (the synthetic set is small: shifts multiply it)
SYNTHETIC_KD = KD(temperature=4.0, alpha=1.0)
SYNTHETIC_CONFIG = TrainConfig(epochs=60, batch_size=64, lr=3e-3, scheduler="cosine", augment_shift=2)
SOURCE_SAMPLES = 20


def errors(model, data) -> int:
    return round((1 - evaluate(model, data)) * len(data))


def student(seed: int = 1, spec: tuple = STUDENT) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ts.create_model(spec[0], **spec[1])


def compare(teacher, train_data, test, config: TrainConfig, seed: int) -> dict:
    init = student(seed)
    config = config.replace(seed=seed)
    alone = copy.deepcopy(init)
    started = time.perf_counter()
    train(alone, train_data, config, progress=False)
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    distilled = distill(copy.deepcopy(init), teacher, train_data, KD_CONFIG, train_config=config, progress=False)
    kd_s = time.perf_counter() - started
    t, a, d = errors(teacher, test), errors(alone, test), errors(distilled, test)
    closed = (a - d) / (a - t) if a != t else float("nan")
    return {"teacher": t, "alone": a, "distilled": d, "closed": closed, "alone_s": alone_s, "kd_s": kd_s,
            "n": len(train_data), "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distillation.md")
    args = parser.parse_args()
    run_started = time.perf_counter()
    digits = ts.load_data("digits")
    torch.manual_seed(0)
    teacher = ts.create_model("resnet")
    started = time.perf_counter()
    train(teacher, digits.train, RECOMMENDED["resnet"], progress=False)
    teacher_s = time.perf_counter() - started
    teacher.eval()
    print(f"teacher: {errors(teacher, digits.test)} errors ({teacher_s:.0f} s)", flush=True)

    full = [compare(teacher, digits.train, digits.test, STUDENT_CONFIG, seed) for seed in SEEDS]
    print("full", full, flush=True)
    x, y = digits.train.tensors
    index = torch.cat([torch.nonzero(y == c)[:5, 0] for c in range(digits.num_classes)])
    few = [compare(teacher, TensorDataset(x[index], y[index]), digits.test, FEW_CONFIG, seed) for seed in FEW_SEEDS]
    print("few", few, flush=True)

    teacher_accuracy = evaluate(teacher, digits.test)
    simulated = []
    for method, config in SYNTHETIC.items():
        started = time.perf_counter()
        source = x[:SOURCE_SAMPLES] if method == "mixup" else None
        model = distill(student(0, SYNTHETIC_STUDENT), teacher, config, SYNTHETIC_KD, train_config=SYNTHETIC_CONFIG,
                        source=source, input_shape=digits.input_shape, progress=False)
        accuracy = evaluate(model, digits.test)
        simulated.append({"method": method, "config": config, "accuracy": accuracy,
                          "ratio": accuracy / teacher_accuracy, "seconds": time.perf_counter() - started,
                          "source": 0 if source is None else len(source)})
        print(simulated[-1], flush=True)
    text = report(teacher, teacher_s, full, few, simulated, teacher_accuracy, time.perf_counter() - run_started)
    atomic_write_text(args.out, text)
    print(text)


def report(teacher, teacher_s, full, few, simulated, teacher_accuracy, total_s) -> str:
    name, kwargs = STUDENT
    lines = [
        "# Distillation benchmark: resnet teacher -> small student on digits",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores (1-minute load "
        f"average {os.getloadavg()[0]:.1f} at the end of the run); torch " + torch.__version__,
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; whole run {total_s:.0f} s "
        "(`python benchmarks/distillation.py`)",
        f"- teacher: resnet ({parameter_stats(teacher)['parameters']:,} parameters) trained with RECOMMENDED['resnet'] "
        f"(seed 0, +-2 px shifts) in {teacher_s:.0f} s",
        f"- student: {name} {kwargs} ({parameter_stats(student())['parameters']:,} parameters), the same init "
        "(per seed), data order and epochs alone and distilled; no augmentation",
        f"- distillation: {KD_CONFIG.to_dict()}",
        "",
        "## Teacher / student alone / distilled student (test errors of 360)",
        "",
        "| transfer set | training images | student seed | teacher | student alone | distilled student | gap closed "
        "| epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows, config in (("full training set", full, STUDENT_CONFIG), ("5 labelled images a class", few,
                                                                               FEW_CONFIG)):
        for row in rows:
            lines.append(f"| {label} | {row['n']} | {row['seed']} | {row['teacher']} | {row['alone']} | "
                         f"{row['distilled']} | {row['closed']:.0%} | {config.epochs} |")
        alone, distilled = sum(r["alone"] for r in rows), sum(r["distilled"] for r in rows)
        t = rows[0]["teacher"] * len(rows)
        closed = (alone - distilled) / (alone - t) if alone != t else float("nan")
        lines.append(f"| {label}, all seeds | | | {t} | {alone} | {distilled} | {closed:.0%} | |")
    lines += [
        "",
        "## Simulated distillation (no labelled training data; the student learns only from the teacher)",
        "",
        f"Teacher test accuracy {teacher_accuracy:.2%}. Student: {SYNTHETIC_STUDENT[0]} "
        f"({parameter_stats(student(0, SYNTHETIC_STUDENT))['parameters']:,} parameters), {SYNTHETIC_KD.to_dict()}, "
        f"trained {SYNTHETIC_CONFIG.epochs} epochs on the synthetic set with +-{SYNTHETIC_CONFIG.augment_shift} px "
        "random shifts, each shifted batch labelled by the live teacher.",
        "",
        "| method | real images used | synthetic samples | student accuracy | of teacher's | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in simulated:
        lines.append(f"| {row['method']} | {row['source']} (unlabelled) | {row['config'].n} | {row['accuracy']:.2%} | "
                     f"{row['ratio']:.0%} | {row['seconds']:.0f} |")
    lines += ["", "Synthetic settings: " + "; ".join(f"{r['method']}: {r['config'].to_dict()}" for r in simulated), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

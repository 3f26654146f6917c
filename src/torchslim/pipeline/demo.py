"""The seed's worked example on the embedded digits: train, compress every way, save, reload, measure, report.

Steps: train the 28x28 -> 10 baseline (``lenet5``, plus Deep Compression's ``lenet300``) and a larger ResNet-style
teacher (``resnet``); then, from the trained LeNet-5: 4-bit integer quantization (nearest and the seed's literal
floor), global magnitude pruning at tau = 0.05 with fine-tuning, teacher-student distillation from the ResNet into a
small student CNN, half precision, static int8 through ONNX Runtime, and the combined recipe (structural pruning ->
distillation -> pruning at tau -> 4-bit -> int8 ONNX). Every row is measured on the reloaded ``.slim`` file against
the fp32 LeNet-5 of the same run. The report (``report.md``, a self-contained ``report.html``, PNG plots) is written
by :mod:`torchslim.pipeline.report` from ``report.json``, so ``torchslim report DIR`` rebuilds it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.pipeline.report import COLUMNS, row_cells

__all__ = ["BASELINE", "COLUMNS", "DemoReport", "combined_recipe", "run_demo"]

BASELINE = "lenet5"
TEACHER = "resnet"
STUDENT = "student_cnn"
TAU = 0.05


@dataclasses.dataclass
class DemoReport:
    """What the demo measured (one entry per artifact) and the files it wrote."""

    results: list[dict]
    markdown_path: Path
    html_path: Path
    json_path: Path
    plots: list[Path]
    onnx: list[Path]
    seconds: float

    def table_rows(self) -> list[list[str]]:
        """Rows for the console table (formatted strings, :data:`COLUMNS` order)."""
        return [row_cells(r) for r in self.results]


def combined_recipe(teacher_path: str, *, epochs: int) -> dict[str, Any]:
    """The seed's combined recipe as a recipe mapping (see ``examples/recipes/seed-worked-example.yaml``).

    Args:
        teacher_path: the teacher's ``.slim`` file (distillation stage).
        epochs: fine-tuning/distillation epochs of each training stage.

    Returns:
        A mapping for :func:`torchslim.pipeline.recipe.parse_recipe`.
    """
    return {
        "name": "seed-combined",
        "description": "structural pruning, distillation from the ResNet teacher, the tau rule, 4-bit, int8 ONNX",
        "stages": [
            {"prune": {"method": "channel", "amount": 0.5}},
            {"distill": {"teacher": teacher_path, "temperature": 4.0, "alpha": 0.9, "epochs": epochs}},
            {"prune": {"method": "magnitude", "scope": "global", "threshold": TAU,
                       "schedule": {"kind": "iterative", "steps": 2, "epochs_per_step": 1,
                                    "finetune_epochs": max(1, epochs // 2)}}},
            {"quantize": {"method": "int", "bits": 4, "granularity": "channel", "epochs": 2, "lr": 1e-4}},
            {"export": {"format": "onnx", "quant": "int8-static"}},
        ],
    }


def run_demo(out_dir: Path, *, quick: bool = False, full: bool = False, progress: bool | None = None,
             say=None) -> DemoReport:
    """Run the worked example end to end and write the report.

    Args:
        out_dir: directory for the ``.slim`` and ``.onnx`` files, plots and reports (created).
        quick: smoke-test settings (two epochs per training run, short sweeps); accuracy is lower.
        full: longer, better-converged training (more epochs for the teacher, distillation and fine-tuning).
        progress: progress bars of the training loop (None: only on a terminal).
        say: called with one line per step (None: silent).

    Returns:
        The :class:`DemoReport`.

    Raises:
        TorchSlimError: a reloaded artifact does not reproduce the saved model's outputs.
    """
    from torchslim.artifact import save
    from torchslim.data import load_data
    from torchslim.export import export_onnx
    from torchslim.pipeline.compress import compress, save_and_measure
    from torchslim.pipeline.recipe import parse_recipe
    from torchslim.pipeline.report import write_report
    from torchslim.prune import MagnitudePruning, PruneSchedule, prune_with_schedule
    from torchslim.quantize import HalfPrecision, IntQuant, StaticInt8, quantize_, quantize_static
    from torchslim.train import recommended_config

    say = say or (lambda _line: None)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_data("digits")
    epochs = 2 if quick else (8 if full else 4)

    def train_config(name: str):
        config = recommended_config(name)
        if quick:
            return config.replace(epochs=2)
        return config.replace(epochs=config.epochs * 2) if full and name == TEACHER else config

    trained: dict[str, nn.Module] = {}
    recipes: dict[str, list] = {}
    for name in (BASELINE, "lenet300", TEACHER):
        config = train_config(name)
        trained[name] = _train(name, splits, config, progress)
        recipes[name] = [{"stage": "train", "data": "digits", "config": config.to_dict()}]
        say(f"trained {name}")
    results = [save_and_measure(name, model, out / f"{name}.slim", splits, recipe=recipes[name])
               for name, model in trained.items()]
    base = trained[BASELINE]
    onnx_files = [out / f"{BASELINE}.onnx"]
    export_onnx(base, splits.example_inputs(1), onnx_files[0])

    def row(name: str, model: nn.Module, stage: dict, since: float, recipe: list | None = None) -> None:
        entry = save_and_measure(name, model, out / f"{name}.slim", splits,
                                 recipe=(recipe if recipe is not None else recipes[BASELINE]) + [stage])
        entry["compress_seconds"] = round(time.perf_counter() - since, 2)
        results.append(entry)
        say(f"measured {name}")

    for name, config in ((f"{BASELINE}-int4", IntQuant(bits=4, granularity="channel")),
                         (f"{BASELINE}-int4-floor", IntQuant(bits=4, granularity="channel", rounding="floor")),
                         (f"{BASELINE}-fp16", HalfPrecision(dtype="fp16"))):
        since = time.perf_counter()
        model = copy.deepcopy(base)
        quantize_(model, config)
        row(name, model, {"stage": "quantize", "config": config.to_dict()}, since)

    since = time.perf_counter()
    pruned = copy.deepcopy(base)
    pruning, schedule = MagnitudePruning(scope="global", threshold=TAU), PruneSchedule(finetune_epochs=epochs)
    prune_with_schedule(pruned, pruning, schedule, splits.train,
                        train_config=recommended_config(BASELINE).replace(lr=5e-4), progress=progress)
    row(f"{BASELINE}-pruned-tau{TAU:g}", pruned,
        {"stage": "prune", "config": pruning.to_dict(), "schedule": schedule.to_dict()}, since)

    since = time.perf_counter()
    student, kd = _distill_student(trained[TEACHER], splits, epochs if quick else 3 * epochs, progress)
    row(f"{STUDENT}-kd", student, {"stage": "distill", "teacher": TEACHER, "config": kd}, since, recipe=[])

    since = time.perf_counter()
    static = StaticInt8()
    graph = quantize_static(base, splits.train, static, example_inputs=splits.example_inputs(1))
    onnx_files.append(out / f"{BASELINE}-int8-static.onnx")
    from torchslim.fileio import atomic_write_bytes

    atomic_write_bytes(onnx_files[-1], graph.onnx_bytes())
    row(f"{BASELINE}-int8-static", graph, {"stage": "quantize", "config": static.to_dict(),
                                           "runtime": "onnxruntime"}, since)

    since = time.perf_counter()
    save(trained[TEACHER], out / f"{TEACHER}.slim", recipe=recipes[TEACHER])
    recipe = parse_recipe(combined_recipe(str(out / f"{TEACHER}.slim"), epochs=epochs), source="demo recipe")
    run = compress(base, splits, recipe, out / "combined", force=True, progress=progress, latency=False,
                   input_recipe=recipes[BASELINE], report=False)
    from torchslim.artifact import load

    row(f"{BASELINE}-combined", load(run.final), {"stage": "compress", "recipe": recipe.to_dict()}, since)
    onnx_files += run.exports
    say("ran the combined recipe")

    sweeps = _sweeps(base, splits, quick)
    for entry in results:  # the manifests hold the recipes; keep report.json readable
        entry.pop("recipe", None)
    seconds = round(time.perf_counter() - started, 1)
    data = {
        "title": "torchslim demo: the seed's worked example on digits 28x28 -> 10",
        "intro": [
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{'quick' if quick else 'full' if full else 'default'} settings, {seconds:.0f} s before plotting. "
            f"Every row is measured on the reloaded `.slim` file (test split, {len(splits.test)} images); "
            f"ratio and speedup are against the fp32 `{BASELINE}` of the same run. "
            "Latency: median of repeated runs after warm-up (torch.utils.benchmark; ONNX Runtime for int8 rows).",
            f"Rows: fp32 {BASELINE}, lenet300 and the ResNet teacher; {BASELINE} with 4-bit weights (the seed's "
            f"affine formula, nearest and floor rounding), global magnitude pruning at tau = {TAU} with fine-tuning, "
            f"a {STUDENT} distilled from the ResNet, fp16, static int8 (ONNX Runtime), and the combined recipe "
            f"({recipe.describe()}).",
            "ONNX files: " + ", ".join(p.name for p in onnx_files) + ".",
        ],
        "baseline": BASELINE,
        "results": results,
        "sweeps": sweeps,
    }
    files = write_report(out, data)
    return DemoReport(results=results, markdown_path=Path(files["markdown"]), html_path=Path(files["html"]),
                      json_path=Path(files["json"]), plots=list(files["plots"]), onnx=onnx_files,
                      seconds=round(time.perf_counter() - started, 1))


def _train(name: str, splits, config, progress) -> nn.Module:
    from torchslim.models import create_model
    from torchslim.train import set_seed, train

    set_seed(config.seed)
    model = create_model(name)
    train(model, splits.train, config, progress=progress)
    return model.eval()


def _distill_student(teacher: nn.Module, splits, epochs: int, progress) -> tuple[nn.Module, dict]:
    """A small CNN trained from the teacher's soft targets (KD); falls back to nothing if distill is missing."""
    from torchslim.distill.api import KD, distill
    from torchslim.models import create_model
    from torchslim.train import recommended_config, set_seed

    config = KD(temperature=4.0, alpha=0.9)
    set_seed(0)
    student = create_model(STUDENT)
    distill(student, teacher, splits.train, config, train_config=recommended_config(STUDENT).replace(epochs=epochs),
            progress=progress)
    return student.eval(), config.to_dict()


def _sweeps(base: nn.Module, splits, quick: bool) -> dict[str, list[dict]]:
    from torchslim.prune import sweep_thresholds
    from torchslim.quantize import sweep_bits

    taus = [0.02, 0.05, 0.1] if quick else [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15]
    bits = [2, 4, 8] if quick else [2, 3, 4, 5, 6, 8]
    return {"tau": [r.to_dict() for r in sweep_thresholds(base, splits, taus)],
            "bits": [r.to_dict() for r in sweep_bits(base, splits, bits)]}

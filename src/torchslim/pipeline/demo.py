"""The seed's worked example on the embedded digits: train, compress every way, save, reload, measure, report.

Steps: train the 28x28 -> 10 baseline (``lenet5``, plus Deep Compression's ``lenet300``) and a ResNet-style teacher
(``resnet``); then, from the trained LeNet-5: 4-bit integer quantization (nearest and the seed's literal floor), global
magnitude pruning at tau = 0.05 followed by fine-tuning, teacher-student distillation from the ResNet into a small
student CNN, half precision, static int8 through ONNX Runtime, and the combined recipe (structural pruning ->
distillation -> pruning at tau -> 4-bit -> int8 ONNX). Every row is measured on the reloaded ``.slim`` file against
the fp32 LeNet-5 of the same run. The report (``report.md``, a self-contained ``report.html``, PNG plots) is written
by :mod:`torchslim.pipeline.report` from ``report.json``, so ``torchslim report DIR`` rebuilds it.

How long each part trains is a :class:`DemoSettings` preset (``quick``, ``default``, ``full``), stated in the report
with the seconds of every step. The default trains every model with its recommended epochs and distils from teacher
logits computed once per image (no augmentation while distilling), which keeps it well under three minutes on two
CPU cores; ``full`` trains the teacher twice as long, distils from the teacher at every step (with augmentation) and
fine-tunes longer; ``quick`` is a smoke test with a narrower teacher (widths 16-128) and a few epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.artifact import load, save
from torchslim.data import load_data
from torchslim.distill.api import KD, distill
from torchslim.export import export_onnx
from torchslim.fileio import atomic_write_bytes
from torchslim.models import create_model
from torchslim.pipeline.compress import compress, deploy_args, save_and_measure
from torchslim.pipeline.recipe import parse_recipe
from torchslim.pipeline.report import COLUMNS, row_cells, write_report
from torchslim.prune import MagnitudePruning, PruneSchedule, prune_with_schedule, sweep_thresholds
from torchslim.prune.api import prunable_layers
from torchslim.quantize import HalfPrecision, IntQuant, StaticInt8, quantize_, quantize_static, sweep_bits
from torchslim.train import recommended_config, set_seed, train

__all__ = ["BASELINE", "COLUMNS", "PRESETS", "DemoReport", "DemoSettings", "combined_recipe", "run_demo"]

BASELINE = "lenet5"
TEACHER = "resnet"
STUDENT = "student_cnn"
TAU = 0.05


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How much the demo trains; the presets are in :data:`PRESETS`, the report states the one that ran.

    Attributes:
        name: the preset's name (shown in the report).
        baseline_epochs: epochs of the LeNet-5 baseline.
        lenet300_epochs: epochs of LeNet-300-100.
        teacher_widths: channel widths of the ResNet teacher's stages (``resnet`` ``widths``).
        teacher_blocks: blocks per stage (``resnet`` ``blocks``).
        teacher_epochs: epochs of the teacher.
        student_epochs: epochs of the distilled student CNN.
        cached_logits: distill from teacher logits computed once per image (no augmentation) instead of every step.
        finetune_epochs: fine-tuning after pruning at tau, and the epochs of the combined recipe's training stages.
        qat_epochs: quantization-aware training epochs of the combined recipe's 4-bit stage.
        taus: thresholds of the pruning sweep.
        bits: widths of the quantization sweep.
        latency: measure latency of every row.
        train_images: train on the first N training images only (None: all); for tests.
    """

    name: str
    baseline_epochs: int
    lenet300_epochs: int
    teacher_widths: tuple[int, ...]
    teacher_blocks: tuple[int, ...]
    teacher_epochs: int
    student_epochs: int
    cached_logits: bool
    finetune_epochs: int
    qat_epochs: int
    taus: tuple[float, ...]
    bits: tuple[int, ...]
    latency: bool = True
    train_images: int | None = None

    def describe(self) -> str:
        """One line for the report: every setting that changes the numbers."""
        teacher = f"resnet(widths={list(self.teacher_widths)}, blocks={list(self.teacher_blocks)})"
        return (f"{self.name} settings: {BASELINE} {self.baseline_epochs} epochs, lenet300 {self.lenet300_epochs}, "
                f"teacher {teacher} {self.teacher_epochs}, {STUDENT} {self.student_epochs} (KD from "
                f"{'teacher logits cached once, no augmentation' if self.cached_logits else 'the teacher every step'}"
                f"), fine-tuning {self.finetune_epochs}, QAT {self.qat_epochs}"
                f"{'' if self.train_images is None else f', first {self.train_images} training images only'}")


_ALL_TAUS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15)
_ALL_BITS = (2, 3, 4, 5, 6, 8)
PRESETS: dict[str, DemoSettings] = {
    "quick": DemoSettings("quick", baseline_epochs=3, lenet300_epochs=5, teacher_widths=(16, 32, 64, 128),
                          teacher_blocks=(1, 1, 1, 1), teacher_epochs=1, student_epochs=4, cached_logits=True,
                          finetune_epochs=1, qat_epochs=1, taus=(0.02, 0.05, 0.1), bits=(2, 4, 8)),
    "default": DemoSettings("default", baseline_epochs=15, lenet300_epochs=30, teacher_widths=(32, 64, 128, 256),
                            teacher_blocks=(1, 1, 1, 2), teacher_epochs=4, student_epochs=20, cached_logits=True,
                            finetune_epochs=8, qat_epochs=2, taus=_ALL_TAUS, bits=_ALL_BITS),
    "full": DemoSettings("full", baseline_epochs=15, lenet300_epochs=30, teacher_widths=(32, 64, 128, 256),
                         teacher_blocks=(1, 1, 1, 2), teacher_epochs=8, student_epochs=20, cached_logits=False,
                         finetune_epochs=8, qat_epochs=3, taus=_ALL_TAUS, bits=_ALL_BITS),
}


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


def combined_recipe(teacher_path: str, *, epochs: int, qat_epochs: int = 2,
                    cached_logits: bool = False) -> dict[str, Any]:
    """The seed's combined recipe as a recipe mapping (see ``examples/recipes/seed-worked-example.yaml``).

    Args:
        teacher_path: the teacher's ``.slim`` file (distillation stage).
        epochs: epochs of the distillation stage (the tau stage fine-tunes for half of them, at least one).
        qat_epochs: quantization-aware training epochs of the 4-bit stage.
        cached_logits: distill from teacher logits computed once (no augmentation during distillation).

    Returns:
        A mapping for :func:`torchslim.pipeline.recipe.parse_recipe`.
    """
    distill: dict[str, Any] = {"teacher": teacher_path, "temperature": 4.0, "alpha": 0.9, "epochs": epochs}
    if cached_logits:
        distill.update(cache_logits=True, augment_shift=0)
    return {
        "name": "seed-combined",
        "description": "structural pruning, distillation from the ResNet teacher, the tau rule, 4-bit, int8 ONNX",
        "stages": [
            {"prune": {"method": "channel", "amount": 0.5}},
            {"distill": distill},
            {"prune": {"method": "magnitude", "scope": "global", "threshold": TAU,
                       "schedule": {"kind": "iterative", "steps": 2, "epochs_per_step": 1,
                                    "finetune_epochs": max(1, epochs // 2)}}},
            {"quantize": {"method": "int", "bits": 4, "granularity": "channel", "epochs": qat_epochs, "lr": 1e-4}},
            {"export": {"format": "onnx", "quant": "int8-static"}},
        ],
    }


def run_demo(out_dir: Path, *, quick: bool = False, full: bool = False, progress: bool | None = None,
             say=None, settings: DemoSettings | None = None) -> DemoReport:
    """Run the worked example end to end and write the report.

    Args:
        out_dir: directory for the ``.slim`` and ``.onnx`` files, plots and reports (created).
        quick: the ``quick`` preset (a smoke test: few epochs, short sweeps; accuracy is lower).
        full: the ``full`` preset (the registry's default ResNet teacher, recommended epochs; takes longer).
        progress: progress bars of the training loop (None: only on a terminal).
        say: called with one line per step (None: silent).
        settings: explicit settings instead of a preset (tests use tiny ones).

    Returns:
        The :class:`DemoReport`.

    Raises:
        ValueError: both ``quick`` and ``full``.
        TorchSlimError: a reloaded artifact does not reproduce the saved model's outputs.
    """
    if quick and full:
        raise ValueError("demo: quick and full are exclusive: expected at most one of --quick, --full")
    settings = settings or PRESETS["quick" if quick else "full" if full else "default"]
    say = say or (lambda _line: None)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = _limit(load_data("digits"), settings.train_images)
    timings: dict[str, float] = {}

    def step(label: str, since: float) -> None:
        timings[label] = round(time.perf_counter() - since, 1)
        say(f"{label} ({timings[label]:.1f} s)")

    trained: dict[str, nn.Module] = {}
    recipes: dict[str, list] = {}
    epochs = {BASELINE: settings.baseline_epochs, "lenet300": settings.lenet300_epochs,
              TEACHER: settings.teacher_epochs}
    kwargs = {TEACHER: {"widths": list(settings.teacher_widths), "blocks": list(settings.teacher_blocks)}}
    for name in (BASELINE, "lenet300", TEACHER):
        since = time.perf_counter()
        config = recommended_config(name).replace(epochs=epochs[name])
        trained[name] = _train(name, splits, config, progress, **kwargs.get(name, {}))
        recipes[name] = [{"stage": "train", "data": "digits", "config": config.to_dict()}]
        step(f"trained {name}", since)

    def measured(name: str, model: nn.Module, recipe: list, since: float | None = None) -> dict:
        begun = time.perf_counter()
        entry = save_and_measure(name, model, out / f"{name}.slim", splits, recipe=recipe, latency=settings.latency,
                                 **deploy_args(out, name, trained[BASELINE], settings.latency))
        if since is not None:
            entry["compress_seconds"] = round(begun - since, 2)
        step(f"measured {name}" if since is None else f"compressed and measured {name}",
             begun if since is None else since)
        return entry

    results = [measured(name, model, recipes[name]) for name, model in trained.items()]
    base = trained[BASELINE]
    onnx_files = [out / f"{BASELINE}.onnx"]
    export_onnx(base, splits.example_inputs(1), onnx_files[0])

    def row(name: str, model: nn.Module, stage: dict, since: float, recipe: list | None = None) -> None:
        results.append(measured(name, model, (recipe if recipe is not None else recipes[BASELINE]) + [stage], since))

    for name, config in ((f"{BASELINE}-int4", IntQuant(bits=4, granularity="channel")),
                         (f"{BASELINE}-int4-floor", IntQuant(bits=4, granularity="channel", rounding="floor")),
                         (f"{BASELINE}-fp16", HalfPrecision(dtype="fp16"))):
        since = time.perf_counter()
        model = copy.deepcopy(base)
        quantize_(model, config)
        row(name, model, {"stage": "quantize", "config": config.to_dict()}, since)

    since = time.perf_counter()
    pruned = copy.deepcopy(base)
    pruning = MagnitudePruning(scope="global", threshold=TAU)
    schedule = PruneSchedule(finetune_epochs=settings.finetune_epochs)
    prune_with_schedule(pruned, pruning, schedule, splits.train,
                        train_config=recommended_config(BASELINE), progress=progress)
    removed = _removed_fraction(base, TAU)
    row(f"{BASELINE}-tau{TAU:g}-finetuned", pruned,
        {"stage": "prune", "config": pruning.to_dict(), "schedule": schedule.to_dict()}, since)
    results[-1]["removed_by_tau"] = removed

    since = time.perf_counter()
    student, kd = _distill_student(trained[TEACHER], splits, settings, progress)
    row(f"{STUDENT}-kd", student, {"stage": "distill", "teacher": TEACHER, "config": kd}, since, recipe=[])

    since = time.perf_counter()
    static = StaticInt8()
    graph = quantize_static(base, splits.train, static, example_inputs=splits.example_inputs(1))
    onnx_files.append(out / f"{BASELINE}-int8-static.onnx")
    atomic_write_bytes(onnx_files[-1], graph.onnx_bytes())
    row(f"{BASELINE}-int8-static", graph, {"stage": "quantize", "config": static.to_dict(),
                                           "runtime": "onnxruntime"}, since)

    since = time.perf_counter()
    save(trained[TEACHER], out / f"{TEACHER}.slim", recipe=recipes[TEACHER])
    recipe = parse_recipe(combined_recipe(str(out / f"{TEACHER}.slim"), epochs=settings.finetune_epochs,
                                          qat_epochs=settings.qat_epochs, cached_logits=settings.cached_logits),
                          source="demo recipe")
    run = compress(base, splits, recipe, out / "combined", force=True, progress=progress, latency=False,
                   input_recipe=recipes[BASELINE], report=False)
    row(f"{BASELINE}-combined", load(run.final), {"stage": "compress", "recipe": recipe.to_dict()}, since)
    onnx_files += run.exports

    since = time.perf_counter()
    sweeps = _sweeps(base, splits, settings)
    step("swept tau and bits", since)
    for entry in results:  # the manifests hold the recipes; keep report.json readable
        entry.pop("recipe", None)
    seconds = round(time.perf_counter() - started, 1)
    data = {
        "title": "torchslim demo: the seed's worked example on digits 28x28 -> 10",
        "intro": [
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {settings.describe()}; "
            f"{seconds:.0f} s before plotting. Every row is measured on the reloaded `.slim` file (test split, "
            f"{len(splits.test)} images); ratio and speedup are against the fp32 `{BASELINE}` of the same run. "
            + ("Latency: median of repeated runs after warm-up (torch.utils.benchmark; ONNX Runtime for int8 rows). "
               "`speedup` columns: the reloaded `.slim` in PyTorch eager (`ts.load`'s default runtime); `deployed` "
               f"columns: the route `torchslim deploy` picked for that file (fastest of PyTorch and ONNX Runtime "
               f"fp32/int8/int4 that keeps parity and accuracy within 0.5 points), timed against the fp32 "
               f"`{BASELINE}` in the same deploy run (`deployed/NAME/deploy.md` lists every route)."
               if settings.latency else "Latency was not measured."),
            f"Rows: fp32 {BASELINE}, lenet300 and the ResNet teacher; {BASELINE} with 4-bit weights (the seed's "
            f"affine formula, nearest and floor rounding), fp16, static int8 (ONNX Runtime), a {STUDENT} distilled "
            f"from the ResNet, and the combined recipe ({recipe.describe()}).",
            f"Pruning at tau = {TAU}: on this {BASELINE} the rule |w| <= {TAU} removes {removed:.1%} of the weights "
            "(PyTorch initialises the 800-input fully connected layer within +-1/sqrt(800) = 0.035 and training "
            "moves most weights little); without retraining that costs the accuracy the tau plot shows, so the "
            f"table row is the pruned model after {settings.finetune_epochs} epochs of fine-tuning with the mask "
            "fixed.",
            "Seconds per step: " + ", ".join(f"{k} {v:g}" for k, v in timings.items()) + ".",
            "ONNX files: " + ", ".join(p.name for p in onnx_files) + ".",
        ],
        "baseline": BASELINE,
        "settings": dataclasses.asdict(settings),
        "timings": timings,
        "results": results,
        "sweeps": sweeps,
    }
    files = write_report(out, data)
    return DemoReport(results=results, markdown_path=Path(files["markdown"]), html_path=Path(files["html"]),
                      json_path=Path(files["json"]), plots=list(files["plots"]), onnx=onnx_files,
                      seconds=round(time.perf_counter() - started, 1))


def _limit(splits, images: int | None):
    """``splits`` with only the first ``images`` training images (None: unchanged)."""
    if images is None:
        return splits
    from torch.utils.data import TensorDataset

    x, y = splits.train.tensors
    return dataclasses.replace(splits, train=TensorDataset(x[:images], y[:images]))


def _removed_fraction(model: nn.Module, tau: float) -> float:
    """Fraction of the prunable layers' weights with |w| <= tau (what the global tau rule removes)."""
    layers = prunable_layers(model)[0].values()
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight.detach().abs() <= tau).sum()) for m in layers) / max(1, total)


def _train(name: str, splits, config, progress, **kwargs) -> nn.Module:
    set_seed(config.seed)
    model = create_model(name, **kwargs)
    train(model, splits.train, config, progress=progress)
    return model.eval()


def _distill_student(teacher: nn.Module, splits, settings: DemoSettings, progress) -> tuple[nn.Module, dict]:
    """A small CNN trained from the teacher's soft targets (KD)."""
    config = KD(temperature=4.0, alpha=0.9, cache_logits=settings.cached_logits)
    train_config = recommended_config(STUDENT).replace(epochs=settings.student_epochs)
    if settings.cached_logits:
        train_config = train_config.replace(augment_shift=0)
    set_seed(0)
    student = create_model(STUDENT)
    distill(student, teacher, splits.train, config, train_config=train_config, progress=progress)
    return student.eval(), {**config.to_dict(), "train": train_config.to_dict()}


def _sweeps(base: nn.Module, splits, settings: DemoSettings) -> dict[str, list[dict]]:
    return {"tau": [r.to_dict() for r in sweep_thresholds(base, splits, list(settings.taus))],
            "bits": [r.to_dict() for r in sweep_bits(base, splits, list(settings.bits))]}

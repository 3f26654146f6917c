"""The end-to-end demo on the embedded digits: train, compress, save, reload, measure, report.

It follows the seed's worked example as far as the landed techniques go: the 28x28 -> 10 digit
models, then 4-bit integer quantization (the seed's formula), half precision and static int8 of
LeNet-5. Every row is measured on the reloaded ``.slim`` artifact, against the fp32 LeNet-5 of the
same run. The pruning and distillation stages join it as they land.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import TorchSlimError
from torchslim.fileio import atomic_write_text

BASELINE = "lenet5"


@dataclasses.dataclass
class DemoReport:
    """What the demo measured, one entry per artifact, and where it wrote the report."""

    results: list[dict]
    markdown_path: Path
    json_path: Path

    def table_rows(self) -> list[list[str]]:
        """Rows for the console table (formatted strings)."""
        return [_row_cells(r) for r in self.results]


COLUMNS = [
    "artifact", "accuracy", "file bytes", "ratio", "params", "nonzero", "bits/weight", "MACs",
    "b1 ms", "b32 ms", "speedup b32", "runtime",
]


def _row_cells(r: dict) -> list[str]:
    m = r["measurement"]
    latency = m["latency"]
    macs = "-" if not m.get("macs") else f"{m['macs']:,}"
    return [
        r["name"], f"{m['accuracy']:.2%}", f"{m['artifact_bytes']:,}", f"{r['ratio_vs_baseline']:.2f}x",
        f"{m['parameters']:,}", f"{m['nonzero_parameters']:,}", f"{m['bits_per_weight']:.2f}", macs,
        f"{latency['1']['median_ms']:.3f}", f"{latency['32']['median_ms']:.3f}", f"{r['speedup_b32']:.2f}x",
        r["runtime"],
    ]


def run_demo(out_dir: Path, *, quick: bool = False, progress: bool | None = None) -> DemoReport:
    """Train the reference digit models, compress LeNet-5, save, reload and measure every artifact.

    Args:
        out_dir: directory for the ``.slim`` files, ``report.md`` and ``report.json`` (created).
        quick: train two epochs per model (smoke test) instead of the recommended settings.
        progress: show progress bars (None: only on a terminal).

    Returns:
        The report with one measured entry per artifact.

    Raises:
        TorchSlimError: if a reloaded artifact does not reproduce the saved model's outputs.
    """
    from torchslim.data import load_data
    from torchslim.models import create_model
    from torchslim.train import RECOMMENDED, TrainConfig, train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_data("digits")
    trained: dict[str, nn.Module] = {}
    recipes: dict[str, list] = {}
    for name in ("lenet300", BASELINE):
        config = RECOMMENDED.get(name, TrainConfig())
        if quick:
            config = config.replace(epochs=2)
        torch.manual_seed(0)
        model = create_model(name)
        train(model, splits.train, config, eval_data=splits.test, progress=progress)
        trained[name] = model.eval()
        recipes[name] = [{"stage": "train", "data": "digits", "config": config.to_dict()}]

    results = [_save_and_measure(name, model, recipes[name], out_dir, splits) for name, model in trained.items()]
    for name, make, stage in _compressions(splits):
        started = time.perf_counter()
        compressed = make(copy.deepcopy(trained[BASELINE]))
        entry = _save_and_measure(name, compressed, recipes[BASELINE] + [stage], out_dir, splits)
        entry["compress_seconds"] = round(time.perf_counter() - started, 2)
        results.append(entry)
    baseline = next(r for r in results if r["name"] == BASELINE)["measurement"]
    for r in results:
        m = r["measurement"]
        r["ratio_vs_baseline"] = baseline["artifact_bytes"] / m["artifact_bytes"]
        r["speedup_b32"] = baseline["latency"]["32"]["median_ms"] / m["latency"]["32"]["median_ms"]
    json_path = atomic_write_text(out_dir / "report.json", json.dumps({"results": results}, indent=2) + "\n")
    markdown_path = atomic_write_text(out_dir / "report.md", _markdown(results))
    return DemoReport(results, Path(markdown_path), Path(json_path))


def _compressions(splits) -> list[tuple[str, Callable[[nn.Module], nn.Module], dict]]:
    """The compressed variants of the baseline: (artifact name, in-place or returning fn, recipe stage)."""
    from torchslim.quantize import HalfPrecision, IntQuant, quantize_

    def weight_only(config):
        def apply(model: nn.Module) -> nn.Module:
            quantize_(model, config)
            return model

        return apply, {"stage": "quantize", "config": config.to_dict()}

    variants = []
    for name, config in (
        (f"{BASELINE}-int4", IntQuant(bits=4, granularity="channel")),
        (f"{BASELINE}-int4-floor", IntQuant(bits=4, granularity="channel", rounding="floor")),
        (f"{BASELINE}-fp16", HalfPrecision(dtype="fp16")),
    ):
        apply, stage = weight_only(config)
        variants.append((name, apply, stage))
    try:
        from torchslim.quantize.int8 import StaticInt8, quantize_static
    except ImportError:  # the int8 path needs onnxruntime (a core dependency, but be explicit)
        return variants
    static = StaticInt8()
    variants.append((
        f"{BASELINE}-int8-static",
        lambda model: quantize_static(model, splits.train, static, example_inputs=splits.example_inputs(1)),
        {"stage": "quantize", "config": static.to_dict(), "runtime": "onnxruntime"},
    ))
    return variants


def _save_and_measure(name: str, model: nn.Module, recipe: list, out_dir: Path, splits) -> dict:
    from torchslim.artifact import load, save
    from torchslim.measure import measure

    path = out_dir / f"{name}.slim"
    save(model, path, recipe=recipe)
    reloaded = load(path)
    test_x = splits.test.tensors[0]
    with torch.inference_mode():
        if not torch.equal(model.eval()(test_x), reloaded(test_x)):
            raise TorchSlimError(f"{path}: the reloaded model's outputs differ from the saved model's")
    measurement = measure(reloaded, splits, artifact_path=path)
    return {
        "name": name,
        "artifact": str(path),
        "runtime": getattr(reloaded, "runtime", "torch"),
        "recipe": recipe,
        "measurement": measurement.to_dict(),
    }


def _markdown(results: list[dict]) -> str:
    lines = [
        "# torchslim demo: digits 28x28 -> 10",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Every row is measured on the reloaded "
        "`.slim` file; ratio and speedup are against the fp32 `lenet5` of the same run. Latency: median of "
        "repeated runs after warm-up (`torch.utils.benchmark`), one run of this demo.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"

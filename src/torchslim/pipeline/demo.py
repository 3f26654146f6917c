"""The end-to-end demo on the embedded digits: train, evaluate, save, reload, measure, report.

This is the foundation's demo (the seed's 28x28 -> 10 digit model, uncompressed baselines). The
compression stages of the worked example join it as they land.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from torchslim.errors import TorchSlimError
from torchslim.fileio import atomic_write_text

DEMO_MODELS = ("lenet300", "lenet5")


@dataclasses.dataclass
class DemoReport:
    """What the demo measured, one entry per model, and where it wrote the report."""

    results: list[dict]
    markdown_path: Path
    json_path: Path

    def table_rows(self) -> list[list[str]]:
        """Rows for the console table (formatted strings)."""
        rows = []
        for r in self.results:
            latency = r["measurement"]["latency"]
            rows.append(
                [
                    r["model"],
                    f"{r['measurement']['accuracy']:.2%}",
                    f"{r['measurement']['artifact_bytes']:,}",
                    f"{r['measurement']['parameters']:,}",
                    f"{r['measurement']['macs']:,}",
                    f"{latency['1']['median_ms']:.3f}",
                    f"{latency['32']['median_ms']:.3f}",
                ]
            )
        return rows


def run_demo(out_dir: Path, *, quick: bool = False, progress: bool | None = None) -> DemoReport:
    """Train the reference digit models, save and reload them, measure the reloaded artifacts.

    Args:
        out_dir: directory for ``MODEL.slim``, ``report.md`` and ``report.json`` (created).
        quick: train two epochs per model (smoke test) instead of the recommended settings.
        progress: show progress bars (None: only on a terminal).

    Returns:
        The report with one measured entry per model.

    Raises:
        TorchSlimError: if a reloaded artifact does not reproduce the trained model's outputs.
    """
    from torchslim.artifact import load, save
    from torchslim.data import load_data
    from torchslim.measure import measure
    from torchslim.models import create_model
    from torchslim.train import RECOMMENDED, TrainConfig, train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_data("digits")
    test_x = splits.test.tensors[0]
    results = []
    for name in DEMO_MODELS:
        config = RECOMMENDED.get(name, TrainConfig())
        if quick:
            config = config.replace(epochs=2)
        model = create_model(name)
        started = time.perf_counter()
        trained = train(model, splits.train, config, eval_data=splits.test, progress=progress)
        seconds = time.perf_counter() - started
        path = out_dir / f"{name}.slim"
        save(model, path, recipe=[{"stage": "train", "data": "digits", "config": config.to_dict()}])
        reloaded = load(path)
        with torch.inference_mode():
            if not torch.equal(model.eval()(test_x), reloaded(test_x)):
                raise TorchSlimError(f"{path}: the reloaded model's outputs differ from the trained model's")
        measurement = measure(reloaded, splits, artifact_path=path)
        results.append(
            {
                "model": name,
                "artifact": str(path),
                "train_seconds": round(seconds, 2),
                "epochs": config.epochs,
                "final_eval_accuracy": trained.final_accuracy,
                "measurement": measurement.to_dict(),
            }
        )
    json_path = atomic_write_text(out_dir / "report.json", json.dumps({"results": results}, indent=2) + "\n")
    markdown_path = atomic_write_text(out_dir / "report.md", _markdown(results))
    return DemoReport(results, Path(markdown_path), Path(json_path))


def _markdown(results: list[dict]) -> str:
    lines = [
        "# torchslim demo: digits 28x28 -> 10",
        "",
        f"Machine: {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Latency is the median of repeated runs after warm-up (`torch.utils.benchmark`).",
        "",
        "| model | epochs | train s | accuracy | file bytes | params | MACs | b1 median ms | b32 median ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["measurement"]
        lines.append(
            f"| {r['model']} | {r['epochs']} | {r['train_seconds']} | {m['accuracy']:.2%} | {m['artifact_bytes']:,} "
            f"| {m['parameters']:,} | {m['macs']:,} | {m['latency']['1']['median_ms']:.3f} "
            f"| {m['latency']['32']['median_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"

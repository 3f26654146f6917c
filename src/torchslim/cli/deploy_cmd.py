"""``torchslim deploy``: build every runtime route of a model, check and time them, write the fastest valid one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from torchslim.cli.common import (
    console,
    is_hf_model,
    is_hf_source,
    load_model_source,
    parse_int_list,
    print_json,
    table,
    text_example,
)
from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.deployment import DeployConfig, DeployReport


def deploy(  # noqa: PLR0913 - Typer: each parameter is one command-line option
    model: Path = typer.Argument(..., help="A .slim or .onnx file, or hf:DIR (a local Hugging Face model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the chosen artifact and deploy.md/.json."),
    target: str = typer.Option("cpu", "--target", help="Hardware target: cpu."),
    batch: str = typer.Option("1,32", "--batch", help="Comma-separated batch sizes to time."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec: accuracy check, int8 calibration."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="One sample's shape, e.g. 1,28,28."),
    reference: Path | None = typer.Option(
        None, "--reference", help="fp32 .slim/.onnx (or hf:DIR) to time as the baseline."),
    routes: str | None = typer.Option(None, "--routes", help="Comma-separated (default: all but torch-compile)."),
    max_accuracy_drop: float = typer.Option(0.5, "--max-accuracy-drop", help="Points a route may lose vs the model."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads for every runtime."),
    min_run_time: float = typer.Option(0.2, "--min-run-time", help="Seconds of timed runs per route and batch."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier deployment in --out."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    text: Path | None = typer.Option(
        None, "--text", help="Token models (hf:DIR or a .slim made from one): texts, one per line, to run the routes "
        "on (default: one short sentence)."),
) -> None:
    """Try every route (PyTorch, ONNX Runtime fp32/int8/int4), check parity and accuracy, time them against
    the fp32 baseline in one run, and write the fastest valid one."""
    options = DeployOptions(model=model, out=out, target=target, batch=batch, data=data, input_shape=input_shape,
                            reference=reference, routes=routes, max_accuracy_drop=max_accuracy_drop, threads=threads,
                            min_run_time=min_run_time, text=text)  # every flag is checked here, before any work
    report = _deploy(options, force=force)
    if json_output:
        print_json(report.to_dict())
        return
    columns = ["route", "status"] + [f"b{b} speedup" for b in report.batch_sizes] + ["accuracy", "note"]
    body = [
        [r.name + (" *" if r.name == report.chosen else ""), r.status]
        + [f"{r.speedup[b]:.2f}x" if b in r.speedup else "-" for b in report.batch_sizes]
        + ["-" if r.accuracy is None else f"{r.accuracy:.2%}", r.reason[:80]]
        for r in report.routes
    ]
    out_console = console()
    title = f"deploy {Path(str(model)).name} ({report.threads} thread(s); speedup vs {report.baseline})"
    out_console.print(table(title, columns, body))
    out_console.print(f"chosen: {report.chosen} -> {report.path}")


@dataclasses.dataclass(frozen=True)
class DeployOptions(Config):
    """What ``torchslim deploy`` was asked to do, checked as a whole on construction.

    Fields are the command's options as typed (``--batch "1,32"`` is ``batch``, ``--routes`` a comma-separated
    string, ``--threads`` is ``threads``); errors name the flag, or the :class:`DeployConfig` field they become.
    """

    model: Path
    out: Path
    target: str = "cpu"
    batch: str = "1,32"
    data: str | None = None
    input_shape: str | None = None
    reference: Path | None = None
    routes: str | None = None
    max_accuracy_drop: float = 0.5
    threads: int | None = None
    min_run_time: float = 0.2
    text: Path | None = None

    def validate(self) -> None:
        """Check the flags; raise :class:`ConfigError` naming the first bad one."""
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads = {self.threads} is invalid: expected an integer >= 1")
        self.deploy_config()
        self.example_shape()

    def deploy_config(self) -> DeployConfig:
        """The library's settings: target, batch sizes, routes, accuracy budget, threads and timing."""
        from torchslim.deployment import DeployConfig

        wanted = [item.strip() for item in self.routes.split(",") if item.strip()] if self.routes else None
        return DeployConfig(target=self.target, batch_sizes=parse_int_list("--batch", self.batch), routes=wanted,
                            max_accuracy_drop=self.max_accuracy_drop, num_threads=self.threads,
                            min_run_time=self.min_run_time)

    def example_shape(self) -> tuple[int, ...] | None:
        """One sample's shape from ``--input-shape``, or None."""
        return parse_int_list("--input-shape", self.input_shape) if self.input_shape else None


def _deploy(options: DeployOptions, *, force: bool) -> DeployReport:
    """Load what the routes run on (data, example inputs, token inputs of an hf model) and deploy."""
    import torch

    from torchslim.data import load_data
    from torchslim.deployment import deploy as run_deploy

    model, data = options.model, options.data
    splits = load_data(data) if data else None
    shape = options.example_shape()
    example = None if shape is None else torch.rand((1, *shape), generator=torch.Generator().manual_seed(0))
    source = str(model) if is_hf_source(model) else model
    reference = options.reference
    if reference is not None and is_hf_source(reference):
        reference = str(reference)
    if is_hf_source(model) or (model.suffix == ".slim" and (options.text is not None or (splits is None and
                                                                                          example is None))):
        loaded, _, _ = load_model_source(source)
        if is_hf_model(loaded):
            example = text_example(loaded, options.text, {"--data": data, "--input-shape": options.input_shape})
    return run_deploy(source, options.out, options.deploy_config(), data=splits, example_inputs=example,
                      reference=reference, force=force)

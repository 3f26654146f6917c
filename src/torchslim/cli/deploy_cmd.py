"""``torchslim deploy``: build every runtime route of a model, check and time them, write the fastest valid one."""

from __future__ import annotations

from pathlib import Path

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


def deploy(
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
    import torch

    from torchslim.data import load_data
    from torchslim.deployment import deploy as run_deploy
    from torchslim.errors import ConfigError

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads = {threads} is invalid: expected an integer >= 1")
    sizes = parse_int_list("--batch", batch)
    splits = load_data(data) if data else None
    example = None
    if input_shape:
        shape = parse_int_list("--input-shape", input_shape)
        example = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0))
    wanted = [item.strip() for item in routes.split(",") if item.strip()] if routes else None
    source = str(model) if is_hf_source(model) else model
    if reference is not None and is_hf_source(reference):
        reference = str(reference)
    if is_hf_source(model) or (model.suffix == ".slim" and (text is not None or (splits is None and example is None))):
        loaded, _, _ = load_model_source(source)
        if is_hf_model(loaded):
            example = text_example(loaded, text, {"--data": data, "--input-shape": input_shape})
    report = run_deploy(
        source, out, target=target, batch_sizes=sizes, data=splits, example_inputs=example, reference=reference,
        routes=wanted, max_accuracy_drop=max_accuracy_drop, num_threads=threads, min_run_time=min_run_time,
        force=force,
    )  # fmt: skip
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
    title = f"deploy {Path(str(source)).name} ({report.threads} thread(s); speedup vs {report.baseline})"
    out_console.print(table(title, columns, body))
    out_console.print(f"chosen: {report.chosen} -> {report.path}")

"""``torchslim train`` and ``torchslim demo``: train, evaluate, save, reload and measure."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from torchslim.cli.common import PROGRESS_OPT, console, print_json, table


def train(  # noqa: PLR0913 - Typer: each parameter is one command-line option
    model: str = typer.Option("lenet5", "--model", "-m", help="Registered model name or package.module:callable."),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, mnist:DIR, npz:FILE, imagefolder:DIR."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .slim file (default: MODEL.slim)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: the model's recommended setting)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adam, adamw or sgd."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="none, cosine or step."),
    seed: int = typer.Option(0, "--seed", help="Random seed (runs are deterministic on CPU)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint file for --resume."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (0: each epoch)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint if it exists."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    progress: bool | None = PROGRESS_OPT,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model on a data set and save it as a .slim file (data parallel under torchrun)."""
    from torchslim.artifact import input_signature
    from torchslim.data import load_data
    from torchslim.distributed import is_main_process, save_on_main, world_size
    from torchslim.fileio import check_output_path
    from torchslim.models.compat import check_model_data, create_model_for_data
    from torchslim.train import RECOMMENDED, TrainConfig, set_seed
    from torchslim.train import train as run_training

    target = check_output_path(out or Path(f"{model.replace(':', '_').replace('.', '_')}.slim"), force=force)
    overrides = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
    }
    config = RECOMMENDED.get(model, TrainConfig()).replace(**{k: v for k, v in overrides.items() if v is not None})
    splits = load_data(data, seed=seed)
    set_seed(seed)  # the initial weights depend on --seed only, not on what ran before in this process
    net = create_model_for_data(model, splits.input_shape, splits.num_classes)
    check_model_data(net, splits.example_inputs(1), splits.num_classes, data)
    net._torchslim_input = input_signature(splits.example_inputs(1))  # recorded in the .slim by save
    started = time.perf_counter()
    result = run_training(
        net, splits.train, config, eval_data=splits.test, checkpoint_path=checkpoint, resume=resume, progress=progress
    )
    seconds = time.perf_counter() - started
    record = {"stage": "train", "data": data, "config": config.to_dict()}
    if world_size() > 1:  # batch_size is per process: the global batch is world_size * batch_size
        record["world_size"] = world_size()
    # Under torchrun every rank trained the same weights; rank 0 alone writes and reports.
    save_on_main(net, target, recipe=[record], measurements={"accuracy": result.final_accuracy, "data": data})
    if not is_main_process():
        return
    summary = {
        "model": model,
        "data": data,
        "out": str(target),
        "epochs": config.epochs,
        "accuracy": result.final_accuracy,
        "seconds": round(seconds, 2),
        "bytes": target.stat().st_size,
        "processes": world_size(),
    }
    if json_output:
        print_json(summary)
    else:
        console().print(
            f"trained {model} on {data}: test accuracy {result.final_accuracy:.2%} after {config.epochs} epochs "
            f"({seconds:.1f} s); saved {target} ({summary['bytes']:,} bytes)"
        )


def demo(
    out: Path = typer.Option(Path("torchslim-demo"), "--out", "-o", help="Directory for the artifacts and report."),
    quick: bool = typer.Option(False, "--quick", help="A smoke test: a few epochs per model, narrower teacher."),
    full: bool = typer.Option(False, "--full", help="Longer training; KD runs the teacher every step (minutes)."),
    progress: bool | None = PROGRESS_OPT,
) -> None:
    """The seed's worked example on the embedded digits: train, compress every way, measure, report."""
    from torchslim.pipeline.demo import COLUMNS, run_demo

    out_console = console()
    report = run_demo(out, quick=quick, full=full, progress=progress, say=lambda line: out_console.print(f"  {line}"))
    out_console.print(table("torchslim demo: digits 28x28 -> 10", COLUMNS, report.table_rows()))
    out_console.print(f"report: {report.markdown_path}  {report.html_path}  ({len(report.plots)} plots, "
                      f"{len(report.onnx)} ONNX files) in {report.seconds:.0f} s")

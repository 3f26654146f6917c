"""``torchslim compress``: run a recipe on a .slim model, or let the budget planner find one."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from torchslim.cli.common import PROGRESS_OPT, console, print_json, table
from torchslim.errors import ConfigError


def compress(
    model: Path = typer.Option(..., "--model", "-m", help="Input .slim file (a trained model)."),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, mnist:DIR, npz:FILE ..."),
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="Recipe YAML (see examples/recipes/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (stage .slim files, report)."),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", help="Planner: accuracy budget in points on a held-out part of the training "
        "split (instead of --recipe); train the model without it for an unbiased budget."),
    target: str = typer.Option("size", "--target", help="Planner: minimise size, latency or macs."),
    time_budget: str = typer.Option("10m", "--time-budget", help="Planner: search time, e.g. 90s, 10m, 1h."),
    seed: int = typer.Option(0, "--seed", help="Planner: seed of the held-out split and of training."),
    teacher: Path | None = typer.Option(
        None, "--teacher", "-t", help="Planner: distill candidates from this .slim (e.g. a larger model trained on "
        "the same data) instead of the input model."),
    resume: bool = typer.Option(False, "--resume", help="Recipe: continue the run in --out, skipping done stages."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out that holds a run."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency of every artifact."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    progress: bool | None = PROGRESS_OPT,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Compress a model with a recipe of stages, or with the budget planner (--max-accuracy-drop)."""
    from torchslim.artifact import load, read_manifest
    from torchslim.cli.common import load_data_for

    if (recipe is None) == (max_accuracy_drop is None):
        raise ConfigError("expected exactly one of --recipe R.yaml or --max-accuracy-drop POINTS")
    if recipe is not None:
        if teacher is not None:
            raise ConfigError("--teacher is for the planner (--max-accuracy-drop): a recipe names its teacher in "
                              "its distill stage")
        from torchslim.pipeline.recipe import load_recipe

        parsed = load_recipe(recipe)  # the whole recipe is validated before the model or data are touched
        net = load(model, trust_factory=trust_factory)
        splits = load_data_for(data, net)
        _run_recipe(net, splits, parsed, out, read_manifest(model).get("recipe"), resume, force, latency, progress,
                    json_output)
        return
    from torchslim.pipeline.planner import PlannerConfig, check_model, parse_duration

    if resume:
        raise ConfigError("--resume is for recipe runs: the planner always starts a new search")
    if teacher is not None and not teacher.is_file():
        raise ConfigError(f"--teacher = {str(teacher)!r} is invalid: expected an existing .slim file")
    config = PlannerConfig(max_accuracy_drop=max_accuracy_drop, target=target, time_budget=parse_duration(time_budget),
                           seed=seed)
    _check_out_dir(out, force)
    net = load(model, trust_factory=trust_factory)
    check_model(net)
    splits = load_data_for(data, net)
    from torchslim.pipeline.planner import holdout_warning, run_planner

    warning = holdout_warning(net, splits, config)
    if warning:
        sys.stderr.write(f"warning: {warning}\n")

    teacher_model = None if teacher is None else load(teacher, trust_factory=trust_factory)
    from torchslim import progress as progress_lib

    # the planner stops within its time budget: the bar's total, so its ETA is an upper bound
    with progress_lib.task(f"plan (budget {time_budget})", config.time_budget, progress=progress) as bar:
        def say(line: str) -> None:
            bar.update(completed=min(bar.elapsed(), config.time_budget))
            bar.line(line, also_bar=True, eta=False)

        result = run_planner(net, splits, config, out, input_recipe=read_manifest(model).get("recipe"),
                             progress=say, latency=latency, teacher=teacher_model,
                             teacher_name=None if teacher is None else str(teacher))
    if json_output:
        print_json(result)
        return
    _print_results(result["report"], out)


def _run_recipe(net, splits, parsed, out, input_recipe, resume, force, latency, progress, json_output) -> None:
    from torchslim.pipeline.compress import compress as run_compress
    from torchslim.pipeline.report import load_report_data

    result = run_compress(net, splits, parsed, out, resume=resume, force=force, progress=progress, latency=latency,
                          input_recipe=input_recipe if isinstance(input_recipe, list) else None)
    if json_output:
        print_json({"out": str(out), "final": str(result.final), "exports": [str(p) for p in result.exports],
                    "input": result.input, "stages": result.stages})
        return
    _print_results(load_report_data(out), out)


def _print_results(report: dict, out: Path) -> None:
    from torchslim.pipeline.report import COLUMNS, row_cells

    printer = console()
    printer.print(table(report.get("title", "torchslim compress"), COLUMNS,
                        [row_cells(r) for r in report.get("results", [])]))
    planner = report.get("planner")
    if planner:
        printer.print(planner["summary"])
    printer.print(f"report: {out / 'report.md'}  {out / 'report.html'}  final model: {out / 'model.slim'}")


def _check_out_dir(out: Path, force: bool) -> None:
    from torchslim.errors import TorchSlimError

    if out.exists() and not out.is_dir():
        raise TorchSlimError(f"--out {str(out)!r} is a file: expected a directory")
    if (out / "report.json").exists() and not force:
        raise TorchSlimError(f"--out {str(out)!r} already holds a report: pass --force to replace it")

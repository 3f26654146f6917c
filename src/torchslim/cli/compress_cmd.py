"""``torchslim compress``: run a recipe on a .slim model, or let the budget planner find one."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from torchslim.cli.common import PROGRESS_OPT, console, print_json, table
from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.pipeline.planner import PlannerConfig


def compress(  # noqa: PLR0913 - Typer: each parameter is one command-line option
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
    options = CompressOptions(model=model, data=data, recipe=recipe, out=out, max_accuracy_drop=max_accuracy_drop,
                              target=target, time_budget=time_budget, seed=seed, teacher=teacher, resume=resume)
    run = _run_recipe if options.recipe is not None else _run_planner
    run(options, force=force, latency=latency, trust_factory=trust_factory, progress=progress,
        json_output=json_output)


@dataclasses.dataclass(frozen=True)
class CompressOptions(Config):
    """What ``torchslim compress`` was asked to do: a recipe run or a planner search, checked on construction.

    Fields are the command's options (``--max-accuracy-drop`` is ``max_accuracy_drop``). Errors name the flag,
    the value and what is allowed; the planner's settings are checked by :class:`PlannerConfig`.
    """

    model: Path
    out: Path
    data: str = "digits"
    recipe: Path | None = None
    max_accuracy_drop: float | None = None
    target: str = "size"
    time_budget: str = "10m"
    seed: int = 0
    teacher: Path | None = None
    resume: bool = False

    def validate(self) -> None:
        """Check the flags together; raise :class:`ConfigError` naming the first bad one."""
        if (self.recipe is None) == (self.max_accuracy_drop is None):
            raise ConfigError("expected exactly one of --recipe R.yaml or --max-accuracy-drop POINTS")
        if self.recipe is not None:
            if self.teacher is not None:
                raise ConfigError("--teacher is for the planner (--max-accuracy-drop): a recipe names its teacher in "
                                  "its distill stage")
            return
        if self.resume:
            raise ConfigError("--resume is for recipe runs: the planner always starts a new search")
        if self.teacher is not None and not self.teacher.is_file():
            raise ConfigError(f"--teacher = {str(self.teacher)!r} is invalid: expected an existing .slim file")
        self.planner_config()

    def planner_config(self) -> PlannerConfig:
        """The planner's settings (``--max-accuracy-drop``, ``--target``, ``--time-budget``, ``--seed``)."""
        from torchslim.pipeline.planner import PlannerConfig, parse_duration

        return PlannerConfig(max_accuracy_drop=self.max_accuracy_drop, target=self.target,
                             time_budget=parse_duration(self.time_budget), seed=self.seed)


def _run_recipe(options: CompressOptions, *, force: bool, latency: bool, trust_factory: bool, progress: bool | None,
                json_output: bool) -> None:
    """``--recipe``: run the recipe's stages in ``--out`` and print the report's table."""
    from torchslim.artifact import load, read_manifest
    from torchslim.cli.common import load_data_for
    from torchslim.pipeline.compress import compress as run_compress
    from torchslim.pipeline.recipe import load_recipe
    from torchslim.pipeline.report import load_report_data

    parsed = load_recipe(options.recipe)  # the whole recipe is validated before the model or data are touched
    net = load(options.model, trust_factory=trust_factory)
    splits = load_data_for(options.data, net)
    input_recipe = read_manifest(options.model).get("recipe")
    out = options.out
    result = run_compress(net, splits, parsed, out, resume=options.resume, force=force, progress=progress,
                          latency=latency, input_recipe=input_recipe if isinstance(input_recipe, list) else None)
    if json_output:
        print_json({"out": str(out), "final": str(result.final), "exports": [str(p) for p in result.exports],
                    "input": result.input, "stages": result.stages})
        return
    _print_results(load_report_data(out), out)


def _run_planner(options: CompressOptions, *, force: bool, latency: bool, trust_factory: bool,
                 progress: bool | None, json_output: bool) -> None:
    """``--max-accuracy-drop``: search for the smallest (or fastest) model within the budget; print the report."""
    from torchslim import progress as progress_lib
    from torchslim.artifact import load, read_manifest
    from torchslim.cli.common import load_data_for
    from torchslim.pipeline.planner import check_model, holdout_warning, run_planner

    config, out, teacher = options.planner_config(), options.out, options.teacher
    _check_out_dir(out, force)
    net = load(options.model, trust_factory=trust_factory)
    check_model(net)
    splits = load_data_for(options.data, net)
    warning = holdout_warning(net, splits, config)
    if warning:
        sys.stderr.write(f"warning: {warning}\n")
    teacher_model = None if teacher is None else load(teacher, trust_factory=trust_factory)
    # the planner stops within its time budget: the bar's total, so its ETA is an upper bound
    with progress_lib.task(f"plan (budget {options.time_budget})", config.time_budget, progress=progress) as bar:
        def say(line: str) -> None:
            bar.update(completed=min(bar.elapsed(), config.time_budget))
            bar.line(line, also_bar=True, eta=False)

        result = run_planner(net, splits, config, out, input_recipe=read_manifest(options.model).get("recipe"),
                             progress=say, latency=latency, teacher=teacher_model,
                             teacher_name=None if teacher is None else str(teacher))
    if json_output:
        print_json(result)
        return
    _print_results(result["report"], out)


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

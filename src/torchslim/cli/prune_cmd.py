"""``torchslim prune``: prune a .slim model (magnitude, N:M or channels), fine-tune it, or sweep thresholds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from torchslim.cli.common import (
    PROGRESS_OPT,
    console,
    holdout_accuracy,
    is_hf_model,
    load_data_for,
    load_model_source,
    no_image_data,
    print_json,
    table,
    token_inputs,
)
from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.prune import MagnitudePruning, NMSparsity
    from torchslim.prune.structural import ChannelPruning

SCHEDULES = ("oneshot", "iterative", "gradual")


def prune(  # noqa: PLR0913 - Typer: each parameter is one command-line option
    path: Path = typer.Argument(..., help="Input .slim file, or hf:DIR (a local Hugging Face model directory)."),
    scope: str | None = typer.Option(
        None, "--scope", help="global (default), layer or neuron; with --structured: layer (default) or global ranking."
    ),
    threshold: float | None = typer.Option(None, "--threshold", help="Prune weights with |w| <= tau (seed's rule)."),
    amount: float | None = typer.Option(None, "--amount", help="Fraction of weights (or channels) removed, in [0, 1)."),
    std_multiplier: float | None = typer.Option(
        None, "--std-multiplier", help="--scope neuron: tau of a neuron = lambda * std of its weights."
    ),
    criterion: str = typer.Option("l1", "--criterion", help="l1, l2 or taylor (taylor needs --data)."),
    nm: str | None = typer.Option(None, "--nm", help="N:M semi-structured sparsity, e.g. 2:4."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole channels physically (needs --amount)."),
    round_to: int = typer.Option(1, "--round-to", help="--structured: kept channel counts are multiples of this."),
    heads: float = typer.Option(0.0, "--heads", help="--structured: fraction of attention heads to remove."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec to evaluate and fine-tune on."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="Epochs of fine-tuning after the last step."),
    lr: float | None = typer.Option(None, "--lr", help="Fine-tuning learning rate (default: the model's recommended)."),
    schedule: str = typer.Option("oneshot", "--schedule", help=f"One of: {', '.join(SCHEDULES)}."),
    steps: int | None = typer.Option(None, "--steps", help="Pruning steps of iterative/gradual (default 3)."),
    epochs_per_step: int = typer.Option(1, "--epochs-per-step", help="Training epochs after each step but the last."),
    initial_sparsity: float = typer.Option(0.0, "--initial-sparsity", help="Gradual schedule: starting sparsity."),
    sweep_threshold: str | None = typer.Option(
        None, "--sweep-threshold", help="Try several tau, e.g. 0.01,0.02,0.05,0.1 (needs --data)."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="PNG for --sweep-threshold (default: beside the input)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .slim file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    progress: bool | None = PROGRESS_OPT,
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Prune weights by magnitude (global/layer/neuron), N:M, or whole channels; fine-tune; save finalized."""
    options = PruneOptions(
        path=path, out=out, scope=scope, threshold=threshold, amount=amount, std_multiplier=std_multiplier,
        criterion=criterion, nm=nm, structured=structured, round_to=round_to, heads=heads, data=data,
        finetune_epochs=finetune_epochs, lr=lr, schedule=schedule, steps=steps, epochs_per_step=epochs_per_step,
        initial_sparsity=initial_sparsity, sweep_threshold=sweep_threshold, plot=plot,
    )  # every flag is checked here, before anything is loaded or written
    if options.sweep_threshold is not None:
        _sweep(options, trust_factory, json_output)
    else:
        _prune(options, force=force, trust_factory=trust_factory, progress=progress, json_output=json_output)


# --- planning: every flag checked before anything is loaded or written ----------------------------------------
@dataclasses.dataclass(frozen=True)
class PruneOptions(Config):
    """What ``torchslim prune`` was asked to do, checked as a whole on construction.

    Fields are the command's options (``--std-multiplier`` is ``std_multiplier``; ``path`` is the input argument).
    Errors name the flag, the value and what is allowed; field errors of the method configs built from the flags
    (``MagnitudePruning``, ``NMSparsity``, ``ChannelPruning``, ``PruneSchedule``, ``TrainConfig``) name their field.
    """

    path: Path
    out: Path | None = None
    scope: str | None = None
    threshold: float | None = None
    amount: float | None = None
    std_multiplier: float | None = None
    criterion: str = "l1"
    nm: str | None = None
    structured: bool = False
    round_to: int = 1
    heads: float = 0.0
    data: str | None = None
    finetune_epochs: int = 0
    lr: float | None = None
    schedule: str = "oneshot"
    steps: int | None = None
    epochs_per_step: int = 1
    initial_sparsity: float = 0.0
    sweep_threshold: str | None = None
    plot: Path | None = None

    def validate(self) -> None:
        """Check the flags together (a sweep, or one pruning run); raise :class:`ConfigError` on the first clash."""
        if self.sweep_threshold is not None:
            self.thresholds()
            return
        self.plan()
        if self.out is None:
            raise ConfigError("--out is missing: expected the output .slim path (or --sweep-threshold)")

    def thresholds(self) -> list[float]:
        """The thresholds of ``--sweep-threshold``, after checking the sweep's flags."""
        given = {"--threshold": self.threshold is not None, "--amount": self.amount is not None,
                 "--nm": self.nm is not None, "--std-multiplier": self.std_multiplier is not None,
                 "--structured": self.structured, "--out": self.out is not None,
                 "--finetune-epochs": self.finetune_epochs != 0, "--schedule": self.schedule != "oneshot"}
        clash = [flag for flag, on in given.items() if on]
        if clash:
            raise ConfigError(f"--sweep-threshold cannot be combined with {clash[0]}: the sweep tries each threshold "
                              "on a copy and writes no model")
        if str(self.path).startswith("hf:"):
            raise ConfigError("--sweep-threshold is invalid for hf:DIR: it scores accuracy on labelled image data "
                              "(--data); compare thresholds with torchslim eval --text instead")
        if self.data is None:
            raise ConfigError("--sweep-threshold needs --data: expected a labelled data spec, e.g. --data digits")
        from torchslim.prune import MagnitudePruning

        thresholds = _parse_floats("--sweep-threshold", self.sweep_threshold)
        for tau in thresholds:  # every value checked before any work
            MagnitudePruning(scope=self.scope or "global", threshold=tau, criterion=self.criterion)
        return thresholds

    def plan(self) -> dict[str, Any]:
        """The pruning run the flags describe.

        Returns:
            ``{"config": the method config, "schedule": PruneSchedule or None (structural), "trains": bool}``.
        """
        from torchslim.prune.schedule import PruneSchedule, schedule_targets
        from torchslim.train import TrainConfig

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule = {self.schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs = {self.finetune_epochs} is invalid: expected an integer >= 0")
        if self.lr is not None:
            TrainConfig(lr=self.lr)  # validates --lr before any work
        if self.criterion == "taylor" and self.data is None:
            raise ConfigError("--criterion taylor needs --data: expected a labelled data spec for the gradients")
        trains = self.finetune_epochs > 0 or (self.schedule != "oneshot" and self.epochs_per_step > 0)
        if trains and self.data is None:
            raise ConfigError("fine-tuning (--finetune-epochs, --schedule) needs --data: expected a data spec to "
                              "train on")
        if self.round_to != 1 and not self.structured:
            raise ConfigError("--round-to needs --structured: it rounds kept channel counts")
        if self.heads and not self.structured:
            raise ConfigError("--heads needs --structured: it removes whole attention heads")
        if self.structured and self.nm is None:
            return {"config": self._channel_config(), "schedule": None, "trains": self.finetune_epochs > 0}
        config = self._nm_config() if self.nm is not None else self._magnitude_config()
        steps = self.steps if self.steps is not None else (1 if self.schedule == "oneshot" else 3)
        plan = PruneSchedule(kind=self.schedule, steps=steps, epochs_per_step=self.epochs_per_step,
                             finetune_epochs=self.finetune_epochs, initial_sparsity=self.initial_sparsity)
        schedule_targets(config, plan)  # a gradual schedule with a threshold, N:M with steps ... fail here
        return {"config": config, "schedule": plan, "trains": trains}

    def _nm_config(self) -> NMSparsity:
        from torchslim.prune import NMSparsity

        clash = [f for f, v in (("--threshold", self.threshold), ("--amount", self.amount),
                                ("--std-multiplier", self.std_multiplier), ("--scope", self.scope)) if v is not None]
        if clash or self.structured:
            raise ConfigError(f"--nm cannot be combined with {(clash + ['--structured'])[0]}: N:M fixes how many "
                              "weights each group keeps")
        n, m = _parse_nm(self.nm)
        return NMSparsity(n=n, m=m, criterion=self.criterion)

    def _channel_config(self) -> ChannelPruning:
        from torchslim.prune.structural import ChannelPruning

        clash = [f for f, v in (("--threshold", self.threshold), ("--std-multiplier", self.std_multiplier))
                 if v is not None]
        if clash:
            raise ConfigError(f"--structured cannot be combined with {clash[0]}: it removes a fraction (--amount) of "
                              "each layer's channels")
        if self.amount is None:
            raise ConfigError("--structured needs --amount: expected the fraction of channels to remove, e.g. 0.5")
        if self.scope not in (None, "layer", "global"):
            raise ConfigError(f"--scope = {self.scope!r} is invalid with --structured: expected layer or global "
                              "(ranking)")
        if self.schedule != "oneshot":
            raise ConfigError(f"--schedule = {self.schedule!r} is invalid with --structured: channel removal is "
                              "one-shot; use --finetune-epochs to recover")
        return ChannelPruning(amount=self.amount, importance=self.criterion, round_to=self.round_to,
                              global_ranking=self.scope == "global", heads=self.heads)

    def _magnitude_config(self) -> MagnitudePruning:
        from torchslim.prune import MagnitudePruning

        if self.threshold is None and self.amount is None and self.std_multiplier is None:
            raise ConfigError("nothing to prune: expected one of --threshold, --amount, --std-multiplier, --nm, "
                              "--structured --amount, or --sweep-threshold")
        return MagnitudePruning(scope=self.scope or "global", threshold=self.threshold, amount=self.amount,
                                std_multiplier=self.std_multiplier, criterion=self.criterion)


def _parse_nm(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--nm = {text!r} is invalid: expected N:M with integers, e.g. 2:4")
    return int(match.group(1)), int(match.group(2))


def _parse_floats(option: str, text: str) -> list[float]:
    values = []
    for item in text.split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            raise ConfigError(f"{option} = {text!r} is invalid: expected comma-separated numbers, e.g. "
                              "0.01,0.02,0.05") from None
    return values


# --- running ---------------------------------------------------------------------------------------------------
def _prune(options: PruneOptions, *, force: bool, trust_factory: bool, progress: bool | None,
           json_output: bool) -> None:
    """Prune, fine-tune and save as ``options`` say; print the summary."""
    from torchslim.artifact import save
    from torchslim.fileio import check_output_path
    from torchslim.measure import parameter_stats

    plan = options.plan()
    path, data, structured = options.path, options.data, options.structured
    target = check_output_path(options.out, path, force=force)

    model, recipe_before, input_bytes = load_model_source(path, trust_factory=trust_factory)
    if is_hf_model(model):
        no_image_data("--data", data)  # (fine-tuning needs --data, so it is refused here too)
    splits = load_data_for(data, model) if data else None
    accuracy_before = holdout_accuracy(model, splits)
    params_before = parameter_stats(model)["parameters"]
    # epochs: those of the recovery run after the last step (the schedule in the recipe holds the others)
    train_config = None
    if plan["trains"]:
        train_config = _train_config(model, options.lr, options.finetune_epochs or options.epochs_per_step)
    if structured:
        result = _structured(model, plan["config"], splits, options.finetune_epochs, train_config, progress)
    else:
        result = _unstructured(model, plan["config"], plan["schedule"], splits, train_config, progress)
    accuracy_after = holdout_accuracy(model, splits)
    stage = {
        "stage": "prune",
        "config": plan["config"].to_dict(),
        "schedule": None if plan["schedule"] is None else plan["schedule"].to_dict(),
        "finetune": None if train_config is None else train_config.to_dict(),
        "data": data,
    }
    measurements: dict[str, Any] = {k: result[k] for k in ("sparsity", "parameters_ratio", "macs_ratio") if k in result}
    if splits is not None:
        measurements.update(accuracy=accuracy_after, data=data)
    save(model, target, recipe=recipe_before + [stage], measurements=measurements)
    summary = {
        "input": str(path),
        "output": str(target),
        "method": plan["config"].config_name,
        "config": plan["config"].to_dict(),
        "schedule": stage["schedule"],
        **result,
        "parameters_before": params_before,
        "parameters_after": parameter_stats(model)["parameters"],
        "input_bytes": input_bytes,
        "output_bytes": target.stat().st_size,
        "compression_ratio": input_bytes / target.stat().st_size,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
    }
    if json_output:
        print_json(summary)
    else:
        _print_summary(summary, path, target, structured)


def _train_config(model, lr: float | None, epochs: int):
    from torchslim.models import factory_of
    from torchslim.train import recommended_config

    factory = factory_of(model) or {}
    config = recommended_config(str(factory.get("name", ""))).replace(epochs=epochs)
    return config if lr is None else config.replace(lr=lr)


def _unstructured(model, config, schedule, splits, train_config, progress) -> dict[str, Any]:
    from torchslim.prune.schedule import prune_with_schedule
    from torchslim.train import TrainConfig

    result = prune_with_schedule(
        model, config, schedule, None if splits is None else splits.train, train_config=train_config or TrainConfig(),
        eval_data=None if splits is None else splits.test, progress=progress,
    )
    report = result.report
    return {"sparsity": report.sparsity, "threshold": report.threshold, "layers": report.layers,
            "skipped": report.skipped, "history": result.history}


def _structured(model, config, splits, epochs, train_config, progress) -> dict[str, Any]:
    from torchslim.prune import prune_

    if is_hf_model(model):  # heads and FFN neurons only, traced on token ids from the tokenizer
        from torchslim.hf import prune_transformer_

        report = prune_transformer_(model, config, token_inputs(model, None))
        return {"macs_before": report.macs_before, "macs_after": report.macs_after, "macs_ratio": report.macs_ratio,
                "parameters_ratio": report.params_ratio, "layers": report.layers, "skipped": report.skipped,
                "history": []}
    if splits is None:
        from torchslim.data import load_data

        example = load_data("digits").example_inputs(1)  # only the input shape is needed
    else:
        example = splits.example_inputs(1)
    report = prune_(model, config, example_inputs=example, data=splits)
    history = []
    if epochs:
        from torchslim.train import train

        run = train(model, splits.train, train_config, eval_data=splits.test, progress=progress)
        history = run.history
    return {"macs_before": report.macs_before, "macs_after": report.macs_after, "macs_ratio": report.macs_ratio,
            "parameters_ratio": report.params_ratio, "layers": report.layers, "skipped": report.skipped,
            "history": history}


# --- output ----------------------------------------------------------------------------------------------------
def _print_summary(summary: dict[str, Any], path: Path, target: Path, structured: bool) -> None:
    out = console()
    rows = [
        ["file bytes", f"{summary['input_bytes']:,}", f"{summary['output_bytes']:,}"],
        ["ratio", "1.00x", f"{summary['compression_ratio']:.2f}x"],
        ["parameters", f"{summary['parameters_before']:,}", f"{summary['parameters_after']:,}"],
    ]
    if structured:
        rows.append(["MACs", f"{summary['macs_before']:,}", f"{summary['macs_after']:,}"])
    else:
        rows.append(["sparsity", "", f"{summary['sparsity']:.2%}"])
    if summary["accuracy_before"] is not None:
        rows.append(["accuracy", f"{summary['accuracy_before']:.2%}", f"{summary['accuracy_after']:.2%}"])
    out.print(table(f"prune {path} -> {target} ({summary['method']})", ["", "before", "after"], rows))
    if structured:
        body = [[name, row["type"], str(row["before"]), str(row["after"])]
                for name, row in summary["layers"].items() if row["before"] != row["after"]]
        out.print(table("changed layers", ["layer", "type", "before", "after"], body))
    else:
        body = [[name, "x".join(map(str, row["shape"])), f"{row['zeros']:,}/{row['numel']:,}", f"{row['sparsity']:.2%}"]
                for name, row in summary["layers"].items()]
        out.print(table("sparsity per layer", ["layer", "shape", "zeros", "sparsity"], body))
        if len(summary["history"]) > 1:
            body = [[h["step"], "-" if h["target_sparsity"] is None else f"{h['target_sparsity']:.2%}",
                     f"{h['achieved_sparsity']:.2%}", _pct(h["accuracy_pruned"]), _pct(h["accuracy"]), h["epochs"]]
                    for h in summary["history"]]
            out.print(table("schedule", ["step", "target", "achieved", "acc. pruned", "acc. trained", "epochs"], body))
    for name, reason in summary["skipped"].items():
        out.print(f"skipped {name}: {reason}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _sweep(options: PruneOptions, trust_factory: bool, json_output: bool) -> None:
    """``--sweep-threshold``: prune copies at each threshold, score them, plot and print the table."""
    from torchslim.artifact import load
    from torchslim.prune.sweep import sweep_thresholds

    path, data, plot, criterion = options.path, options.data, options.plot, options.criterion
    scope = options.scope or "global"
    thresholds = options.thresholds()
    model = load(path, trust_factory=trust_factory)
    splits = load_data_for(data, model)
    plot_path = plot or path.with_name(path.stem + "-threshold-sweep.png")
    rows = sweep_thresholds(model, splits, thresholds, scope=scope, criterion=criterion, plot_path=plot_path)
    if json_output:
        print_json({"plot": str(plot_path), "rows": [r.to_dict() for r in rows]})
        return
    dense = rows[0].file_bytes
    body = [[r.label, f"{r.sparsity:.2%}", f"{r.file_bytes:,}", f"{r.file_bytes / dense:.3f}", f"{r.accuracy:.2%}"]
            for r in rows]
    out = console()
    out.print(table(f"threshold sweep of {path} on {data} ({scope}, {criterion})",
                    ["tau", "sparsity", "file bytes", "vs fp32", "accuracy"], body))
    names = list(rows[0].layers)
    out.print(table("sparsity per layer", ["tau", *names],
                    [[r.label, *[f"{r.layers[n]:.2%}" for n in names]] for r in rows]))
    out.print(f"plot: {plot_path}")

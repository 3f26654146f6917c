"""``torchslim quantize``: quantize a .slim model, or sweep bit widths to choose one."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import typer

from torchslim.cli.common import (
    console,
    holdout_accuracy,
    is_hf_model,
    is_hf_source,
    load_data_for,
    load_model_source,
    no_image_data,
    parse_int_list,
    print_json,
    table,
    token_inputs,
)
from torchslim.config import Config, stage_modes
from torchslim.errors import ConfigError


def quantize_modes() -> dict[str, type[Config]]:
    """``--mode`` name -> config class: every registered quantize method (a config with ``stage = "quantize"``)."""
    import torchslim.quantize  # noqa: F401  (registers the library's methods)

    return stage_modes("quantize")


@dataclasses.dataclass(frozen=True)
class QuantizeRequest(Config):
    """What ``torchslim quantize`` was asked to do; :meth:`validate` holds every cross-check between flags.

    Args:
        mode: a ``--mode`` of :func:`quantize_modes`.
        options: the method's options the user gave (``bits``, ``granularity`` ... named like config fields).
        overrides: ``--override NAME=BITS|none`` items.
        data, calib: data specs (evaluation/QAT/sweep; calibration).
        qat, kd, epochs, lr: quantization-aware training and its settings.
        sweep: bit widths to sweep (``"2,4,8"``) instead of writing one model.
        out: the output ``.slim`` (required unless ``sweep``).
        hf_source: the input is ``hf:DIR``.
    """

    mode: str = "int"
    options: dict = dataclasses.field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    data: str | None = None
    calib: str | None = None
    qat: bool = False
    kd: bool = True
    epochs: int = 3
    lr: float = 2e-4
    sweep: str | None = None
    out: Path | None = None
    hf_source: bool = False

    def validate(self) -> None:
        """Check the flags together (no model or data is loaded); raise :class:`ConfigError` naming the flag."""
        modes = quantize_modes()
        if self.mode not in modes:
            raise ConfigError(f"--mode = {self.mode!r} is invalid: expected one of {', '.join(modes)}")
        if self.sweep is not None:
            if self.hf_source:
                raise ConfigError("--sweep is invalid for hf:DIR: it scores accuracy on labelled image data (--data); "
                                  "compare widths with torchslim eval --text instead")
            if self.data is None:
                raise ConfigError("--sweep needs --data: expected a labelled data spec, e.g. --data digits")
            return
        if self.out is None:
            raise ConfigError("--out is missing: expected the output .slim path (or --sweep)")
        if self.qat and self.data is None:
            raise ConfigError("--qat needs --data: expected a data spec to train on, e.g. --data digits")
        if self.qat and not modes[self.mode].trains:
            trainers = ", ".join(mode for mode, cls in modes.items() if cls.trains)
            raise ConfigError(f"--qat is invalid with --mode {self.mode}: expected a mode that trains ({trainers})")
        self.method_overrides(self.method())

    def method(self) -> Config:
        """The method's config built from the options (``ConfigError`` names a bad option)."""
        return quantize_modes()[self.mode].from_options(self.mode, self.options)

    def method_overrides(self, method: Config) -> dict[str, Config | None]:
        """Per-layer configs from ``--override NAME=BITS|none``: the method's config with other bits, or None."""
        return _parse_overrides(list(self.overrides), method)


def quantize(  # noqa: PLR0913 - Typer: each parameter is one command-line option
    path: Path = typer.Argument(..., help="Input .slim file, or hf:DIR (a local Hugging Face model directory)."),
    mode: str = typer.Option("int", "--mode", help="Method: int, codebook, fp16, bf16, gptq, int8-static, "
                             "int8-dynamic, or any other registered quantize config."),
    bits: int | None = typer.Option(None, "--bits", help="Bits per weight (int, codebook, gptq), 2..8 [default: 4]."),
    granularity: str | None = typer.Option(None, "--granularity", help="tensor, channel or group [default: channel]."),
    group_size: int | None = typer.Option(None, "--group-size", help="Weights per group (granularity group) "
                                          "[default: 128]."),
    symmetric: bool | None = typer.Option(None, "--symmetric/--asymmetric", help="Fixed mid-range zero point "
                                          "[default: asymmetric]."),
    rounding: str | None = typer.Option(None, "--rounding", help="nearest, or floor (the seed's literal formula)."),
    override: list[str] = typer.Option([], "--override", help="Per-layer bits: NAME=BITS or NAME=none (repeatable)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec to evaluate on (and QAT/sweep data)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration data spec (int8-static, gptq)."),
    observer: str | None = typer.Option(None, "--observer", help="int8-static observer: minmax, percentile, mse."),
    qat: bool = typer.Option(False, "--qat", help="Quantization-aware training (needs --data)."),
    kd: bool = typer.Option(True, "--kd/--no-kd", help="QAT: learn from the input model's outputs too (distillation, "
                            "default) or from the labels alone."),
    epochs: int = typer.Option(3, "--epochs", help="QAT epochs."),
    lr: float = typer.Option(2e-4, "--lr", help="QAT learning rate."),
    sweep: str | None = typer.Option(None, "--sweep", help="Try several widths, e.g. 2,3,4,6,8 (needs --data)."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG for --sweep (default: beside --out or the input)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .slim file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    text: Path | None = typer.Option(
        None, "--text", help="hf:DIR models: texts, one per line, for calibration (gptq, int8) and fidelity."
    ),
    act_order: bool | None = typer.Option(None, "--act-order/--no-act-order", help="gptq: columns in order of "
                                          "decreasing activation [default: on]."),
    clip_search: bool | None = typer.Option(None, "--clip-search/--no-clip-search", help="gptq: each group's range "
                                            "by a Hessian-weighted error search, or plain min/max [default: on]."),
    embeddings: bool = typer.Option(False, "--embeddings", help="int: quantize nn.Embedding tables too (a tied "
                                    "lm_head shares the embedding's codes, stored once)."),
) -> None:
    """Quantize weights (k-bit integer, GPTQ, codebook, fp16/bf16) or convert to int8 for ONNX Runtime."""
    from torchslim.fileio import check_output_path

    given = {"bits": bits, "granularity": granularity, "group_size": group_size, "symmetric": symmetric,
             "rounding": rounding, "observer": observer, "act_order": act_order,
             "clip_search": clip_search,
             "embeddings": embeddings or None}
    request = QuantizeRequest(mode=mode, options={k: v for k, v in given.items() if v is not None},
                              overrides=tuple(override), data=data, calib=calib, qat=qat, kd=kd, epochs=epochs, lr=lr,
                              sweep=sweep, out=out, hf_source=is_hf_source(path))
    if sweep is not None:
        _sweep(path, request, plot, trust_factory, json_output)
        return
    target = check_output_path(out, path, force=force)
    texts = None
    if text is not None:
        from torchslim.hf import read_texts

        texts = read_texts(text)  # checked before the model is loaded
    method = request.method()
    overrides = request.method_overrides(method)
    # weight-only methods read a Hugging Face model's blocks one at a time (GPTQ, RTN): peak memory ~ one float block
    from torchslim.quantize import GPTQ, IntQuant

    lazy = isinstance(method, (GPTQ, IntQuant))
    model, recipe_before, input_bytes = load_model_source(path, trust_factory=trust_factory, lazy=lazy)
    hf = is_hf_model(model)
    if hf:
        _check_hf(request, method, texts)
    elif texts is not None:
        raise ConfigError("--text is for Hugging Face models (hf:DIR or a .slim made from one): expected --data")
    splits = load_data_for(data, model) if data else None
    accuracy_before = holdout_accuracy(model, splits)
    inputs = _Inputs(request, splits, hf, texts, None if text is None else str(text))
    model, stage, skipped = _apply(model, method, overrides, request, inputs)
    accuracy_after = holdout_accuracy(model, splits)
    measurements = {"accuracy": accuracy_after, "data": data} if splits else None
    fidelity = None
    if hf and texts is not None:
        from torchslim.hf import reference_model, text_fidelity

        fidelity = text_fidelity(model, reference_model(model), texts)
        measurements = {"text_fidelity": {**fidelity, "text": str(text)}}
    from torchslim.artifact import save

    save(model, target, recipe=recipe_before + [stage], measurements=measurements)
    summary = {
        "input": str(path),
        "output": str(target),
        "mode": mode,
        "input_bytes": input_bytes,
        "output_bytes": target.stat().st_size,
        "compression_ratio": input_bytes / target.stat().st_size,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "cosine": None if fidelity is None else fidelity["cosine"],
        "top1_agreement": None if fidelity is None else fidelity["top1_agreement"],
        "skipped": skipped,
    }
    if json_output:
        print_json(summary)
        return
    _print_summary(summary, path, target, mode)


def _print_summary(summary: dict[str, Any], path: Path, target: Path, mode: str) -> None:
    rows = [
        ["file bytes", f"{summary['input_bytes']:,}", f"{summary['output_bytes']:,}"],
        ["ratio", "1.00x", f"{summary['compression_ratio']:.2f}x"],
    ]
    if summary["accuracy_before"] is not None:
        rows.append(["accuracy", f"{summary['accuracy_before']:.2%}", f"{summary['accuracy_after']:.2%}"])
    if summary["cosine"] is not None:
        rows.append(["cosine to the original (text)", "1.0000", f"{summary['cosine']:.4f}"])
    out_console = console()
    out_console.print(table(f"quantize {path} -> {target} ({mode})", ["", "before", "after"], rows))
    for name, reason in summary["skipped"].items():
        out_console.print(f"skipped {name}: {reason}")


@dataclasses.dataclass
class _Inputs:
    """The data a method may need: the request's specs, the loaded splits, the --text texts and path (hf models)."""

    request: QuantizeRequest
    splits: Any
    hf: bool
    texts: list[str] | None
    text_path: str | None

    def calibration(self, model, what: str) -> Any:
        """DataSplits of --calib (or --data); ``what`` names the need in the error."""
        spec = self.request.calib or self.request.data
        if spec is None:
            raise ConfigError(f"--mode {self.request.mode} needs {what}: expected --calib SPEC or --data SPEC "
                              "(--text FILE for hf:DIR)")
        return self.splits if self.splits is not None and spec == self.splits.spec else load_data_for(spec, model)


def _apply(model, method: Config, overrides: dict, request: QuantizeRequest, inputs: _Inputs):
    """Run the method through the library; return ``(model, manifest stage record, skipped layers)``."""
    from torchslim.quantize import quantize_

    overrides_record = {k: (None if v is None else v.to_dict()) for k, v in overrides.items()}
    if method.produces_graph:
        return _to_graph(model, method, inputs)
    if method.needs_calibration:
        from torchslim import progress

        hf = inputs.hf
        calib_inputs = token_inputs(model, inputs.texts) if hf else inputs.calibration(model, "calibration inputs")
        # GPTQ reports each block of a block-list model itself (with ETA); this adds the line when done
        with progress.task(method.config_name) as bar:
            report = quantize_(model, method, overrides=overrides, calib_inputs=calib_inputs)
            bar.line(f"{len(report.quantized)} layers quantized", also_bar=True)
        stage = {"stage": "quantize", "config": method.to_dict(), "overrides": overrides_record,
                 "calibration": inputs.text_path if hf else (request.calib or request.data)}
        return model, stage, report.skipped
    if request.qat:
        from torchslim.distill.api import KD, kd_loss_fn
        from torchslim.quantize.qat import qat as run_qat
        from torchslim.train import TrainConfig

        train_config = TrainConfig(epochs=request.epochs, lr=request.lr)
        # distil from the fp32 model, frozen, before any change
        loss_fn = kd_loss_fn(copy.deepcopy(model).eval(), KD()) if request.kd else None
        report = run_qat(model, inputs.splits.train, method, train_config, eval_data=inputs.splits.test,
                         overrides=overrides, loss_fn=loss_fn)
        stage = {"stage": "quantize", "qat": train_config.to_dict(), "config": method.to_dict(),
                 "teacher": "the input model" if request.kd else None}
        return model, stage, report.skipped
    report = quantize_(model, method, overrides=overrides)
    return model, {"stage": "quantize", "config": method.to_dict(), "overrides": overrides_record}, report.skipped


def _to_graph(model, method: Config, inputs: _Inputs):
    """An ONNX Runtime graph (int8): calibrated on --calib/--data, or on the example inputs alone."""
    from torchslim.quantize import quantize_to_graph
    from torchslim.quantize.int8 import quantize_dynamic

    if inputs.hf:  # a token model: activations quantized per batch (_check_hf refused calibration)
        graph = quantize_dynamic(model, method, example_inputs=token_inputs(model, inputs.texts))
    elif method.needs_calibration:
        graph = quantize_to_graph(model, method, inputs.calibration(model, "calibration data"))
    else:
        if inputs.splits is None:
            raise ConfigError(f"--mode {inputs.request.mode} needs --data: expected a data spec for the example "
                              "input shape")
        graph = quantize_to_graph(model, method, inputs.splits)
    return graph, {"stage": "quantize", "config": method.to_dict(), "runtime": "onnxruntime"}, dict(graph.skipped)


def _check_hf(request: QuantizeRequest, method: Config, texts) -> None:
    """Options a Hugging Face model (token ids, no labels) cannot use, refused before any work."""
    no_image_data("--data", request.data)
    no_image_data("--calib", request.calib)
    if request.qat:
        raise ConfigError("--qat is invalid for a Hugging Face model: it trains on labelled image data (--data)")
    if method.produces_graph and method.needs_calibration:
        modes = quantize_modes().items()
        dynamic = ", ".join(m for m, cls in modes if cls.produces_graph and not cls.needs_calibration)
        raise ConfigError(f"--mode {request.mode} is invalid for a Hugging Face model: expected {dynamic} (token "
                          "models quantize activations per batch)")
    if method.needs_calibration and texts is None:
        raise ConfigError(f"--mode {request.mode} needs --text FILE for a Hugging Face model: expected calibration "
                          "texts, one per line")


def _parse_overrides(items: list[str], base: Config) -> dict[str, Config | None]:
    overrides: dict[str, Config | None] = {}
    fields = {f.name for f in dataclasses.fields(base)}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--override = {item!r} is invalid: expected NAME=BITS or NAME=none")
        if base.produces_graph:
            raise ConfigError(f"--override = {item!r} is invalid with --mode {base.config_name}: it converts the whole "
                              "model to one graph; expected no --override")
        if value.lower() == "none":
            overrides[name] = None
        elif value.isdigit() and "bits" in fields:
            overrides[name] = base.replace(bits=int(value))
        elif value.isdigit():
            raise ConfigError(f"--override = {item!r} is invalid with {type(base).__name__}, which has no bits: "
                              "expected NAME=none")
        else:
            raise ConfigError(f"--override = {item!r} is invalid: expected NAME=BITS (2..8) or NAME=none")
    return overrides


def _sweep(path: Path, request: QuantizeRequest, plot: Path | None, trust_factory: bool, json_output: bool) -> None:
    from torchslim.artifact import load
    from torchslim.quantize import IntQuant
    from torchslim.quantize.sweep import sweep_bits

    data = request.data
    widths = parse_int_list("--sweep", request.sweep)
    base = IntQuant.from_options("int", {k: v for k, v in request.options.items() if k != "bits"})
    model = load(path, trust_factory=trust_factory)
    splits = load_data_for(data, model)
    plot_path = plot or path.with_name(path.stem + "-bits-sweep.png")
    rows = sweep_bits(model, splits, widths, base, plot_path=plot_path)
    if json_output:
        print_json({"plot": str(plot_path), "rows": [r.to_dict() for r in rows]})
        return
    body = [[r.label, f"{r.accuracy:.2%}", f"{r.file_bytes:,}", f"{r.bits_per_weight:.2f}"] for r in rows]
    out_console = console()
    out_console.print(
        table(f"bit-width sweep of {path} on {data}", ["width", "accuracy", "file bytes", "file bits/param"], body)
    )
    out_console.print(f"plot: {plot_path}")

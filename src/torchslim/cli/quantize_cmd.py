"""``torchslim quantize``: quantize a .slim model, or sweep bit widths to choose one."""

from __future__ import annotations

import copy
from pathlib import Path

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
from torchslim.errors import ConfigError

MODES = ("int", "codebook", "fp16", "bf16", "int8-static", "int8-dynamic", "gptq")


def quantize(
    path: Path = typer.Argument(..., help="Input .slim file, or hf:DIR (a local Hugging Face model directory)."),
    mode: str = typer.Option("int", "--mode", help=f"One of: {', '.join(MODES)}."),
    bits: int = typer.Option(4, "--bits", help="Bits per weight (int, codebook), 2..8."),
    granularity: str = typer.Option("channel", "--granularity", help="tensor, channel or group."),
    group_size: int = typer.Option(128, "--group-size", help="Weights per group (granularity group)."),
    symmetric: bool = typer.Option(False, "--symmetric/--asymmetric", help="Fixed mid-range zero point."),
    rounding: str = typer.Option("nearest", "--rounding", help="nearest, or floor (the seed's literal formula)."),
    override: list[str] = typer.Option([], "--override", help="Per-layer bits: NAME=BITS or NAME=none (repeatable)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec to evaluate on (and QAT/sweep data)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration data spec for int8-static."),
    observer: str = typer.Option("minmax", "--observer", help="int8-static observer: minmax, percentile, mse."),
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
    act_order: bool = typer.Option(False, "--act-order", help="gptq: columns in order of decreasing activation."),
) -> None:
    """Quantize weights (k-bit integer, GPTQ, codebook, fp16/bf16) or convert to int8 for ONNX Runtime."""
    from torchslim.fileio import check_output_path

    if mode not in MODES:
        raise ConfigError(f"--mode = {mode!r} is invalid: expected one of {', '.join(MODES)}")
    if sweep is not None and is_hf_source(path):
        raise ConfigError("--sweep is invalid for hf:DIR: it scores accuracy on labelled image data (--data); "
                          "compare widths with torchslim eval --text instead")
    if sweep is not None:
        _sweep(path, sweep, data, plot, granularity, group_size, symmetric, rounding, trust_factory, json_output)
        return
    if out is None:
        raise ConfigError("--out is missing: expected the output .slim path (or --sweep)")
    target = check_output_path(out, path, force=force)
    if qat and data is None:
        raise ConfigError("--qat needs --data: expected a data spec to train on, e.g. --data digits")
    from torchslim.artifact import save
    from torchslim.quantize import CodebookQuant, HalfPrecision, IntQuant, quantize_

    int_config = IntQuant(
        bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding
    )
    gptq_config = _gptq_config(int_config, act_order) if mode == "gptq" else None
    if act_order and mode != "gptq":
        raise ConfigError(f"--act-order is invalid with --mode {mode}: expected --mode gptq")
    texts = None
    if text is not None:
        from torchslim.hf import read_texts

        texts = read_texts(text)  # checked before the model is loaded
    configs = {
        "int": int_config,
        "codebook": CodebookQuant(bits=bits),
        "fp16": HalfPrecision("fp16"),
        "bf16": HalfPrecision("bf16"),
    }
    overrides = _parse_overrides(override, int_config)
    model, recipe_before, input_bytes = load_model_source(path, trust_factory=trust_factory)
    hf = is_hf_model(model)
    if hf:
        _check_hf(data, calib, qat, mode, texts)
    elif texts is not None:
        raise ConfigError("--text is for Hugging Face models (hf:DIR or a .slim made from one): expected --data")
    splits = load_data_for(data, model) if data else None
    accuracy_before = holdout_accuracy(model, splits)
    if hf and mode == "int8-dynamic":
        from torchslim.quantize.int8 import DynamicInt8, quantize_dynamic

        config = DynamicInt8()
        model = quantize_dynamic(model, config, example_inputs=token_inputs(model, texts))
        stage = {"stage": "quantize", "config": config.to_dict(), "runtime": "onnxruntime"}
        skipped = dict(model.skipped)
    elif mode in ("int8-static", "int8-dynamic"):
        model, stage, skipped = _int8(model, mode, calib or data, observer, splits)
    elif mode == "gptq":
        from torchslim.quantize.gptq import gptq_

        if hf:
            calib_inputs = token_inputs(model, texts)
        else:
            if calib is None and data is None:
                raise ConfigError("--mode gptq needs calibration inputs: expected --calib SPEC or --data SPEC "
                                  "(--text FILE for hf:DIR)")
            calib_inputs = splits if splits is not None and (calib or data) == splits.spec else load_data_for(
                calib, model)
        from torchslim import progress

        # one line when done: gptq_ has no per-layer hook (its loop is GPTQ's own), so no ETA
        with progress.task("gptq") as bar:
            report = gptq_(model, gptq_config, calib_inputs, overrides=overrides)
            bar.line(f"{len(report.quantized)} layers quantized", also_bar=True)
        stage = {
            "stage": "quantize",
            "config": gptq_config.to_dict(),
            "overrides": {k: (None if v is None else v.to_dict()) for k, v in overrides.items()},
            "calibration": str(text) if hf else (calib or data),
        }
        skipped = report.skipped
    elif qat:
        from torchslim.distill.api import KD, kd_loss_fn
        from torchslim.quantize.qat import qat as run_qat
        from torchslim.train import TrainConfig

        train_config = TrainConfig(epochs=epochs, lr=lr)
        # distil from the fp32 model, frozen, before any change
        loss_fn = kd_loss_fn(copy.deepcopy(model).eval(), KD()) if kd else None
        report = run_qat(model, splits.train, int_config, train_config, eval_data=splits.test, overrides=overrides,
                         loss_fn=loss_fn)
        stage = {"stage": "quantize", "qat": train_config.to_dict(), "config": int_config.to_dict(),
                 "teacher": "the input model" if kd else None}
        skipped = report.skipped
    else:
        report = quantize_(model, configs[mode], overrides=overrides)
        stage = {
            "stage": "quantize",
            "config": configs[mode].to_dict(),
            "overrides": {k: (None if v is None else v.to_dict()) for k, v in overrides.items()},
        }
        skipped = report.skipped
    accuracy_after = holdout_accuracy(model, splits)
    recipe = recipe_before + [stage]
    measurements = {"accuracy": accuracy_after, "data": data} if splits else None
    fidelity = None
    if hf and texts is not None:
        from torchslim.hf import reference_model, text_fidelity

        fidelity = text_fidelity(model, reference_model(model), texts)
        measurements = {"text_fidelity": {**fidelity, "text": str(text)}}
    save(model, target, recipe=recipe, measurements=measurements)
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
    out_console = console()
    rows = [
        ["file bytes", f"{summary['input_bytes']:,}", f"{summary['output_bytes']:,}"],
        ["ratio", "1.00x", f"{summary['compression_ratio']:.2f}x"],
    ]
    if splits is not None:
        rows.append(["accuracy", f"{accuracy_before:.2%}", f"{accuracy_after:.2%}"])
    if fidelity is not None:
        rows.append(["cosine to the original (text)", "1.0000", f"{fidelity['cosine']:.4f}"])
    out_console.print(table(f"quantize {path} -> {target} ({mode})", ["", "before", "after"], rows))
    for name, reason in skipped.items():
        out_console.print(f"skipped {name}: {reason}")


def _gptq_config(int_config, act_order: bool):
    from torchslim.quantize.gptq import GPTQ

    if int_config.granularity == "tensor":
        raise ConfigError("--granularity = 'tensor' is invalid with --mode gptq: expected channel or group")
    if int_config.rounding != "nearest":
        raise ConfigError(f"--rounding = {int_config.rounding!r} is invalid with --mode gptq: expected nearest")
    group = int_config.group_size if int_config.granularity == "group" else None
    return GPTQ(bits=int_config.bits, group_size=group, act_order=act_order, symmetric=int_config.symmetric)


def _check_hf(data, calib, qat: bool, mode: str, texts) -> None:
    """Options a Hugging Face model (token ids, no labels) cannot use, refused before any work."""
    no_image_data("--data", data)
    no_image_data("--calib", calib)
    if qat:
        raise ConfigError("--qat is invalid for a Hugging Face model: it trains on labelled image data (--data)")
    if mode == "int8-static":
        raise ConfigError("--mode int8-static is invalid for a Hugging Face model: expected int8-dynamic (token "
                          "models quantize activations per batch)")
    if mode == "gptq" and texts is None:
        raise ConfigError("--mode gptq needs --text FILE for a Hugging Face model: expected calibration texts, "
                          "one per line")


def _parse_overrides(items: list[str], base) -> dict:
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--override = {item!r} is invalid: expected NAME=BITS or NAME=none")
        if value.lower() == "none":
            overrides[name] = None
        elif value.isdigit():
            overrides[name] = base.replace(bits=int(value))
        else:
            raise ConfigError(f"--override = {item!r} is invalid: expected NAME=BITS (2..8) or NAME=none")
    return overrides




def _int8(model, mode: str, calib: str | None, observer: str, splits):
    from torchslim.quantize.int8 import DynamicInt8, StaticInt8, quantize_dynamic, quantize_static

    if mode == "int8-static":
        if calib is None:
            raise ConfigError("--mode int8-static needs --calib (or --data): expected a calibration data spec")
        calib_splits = splits if splits is not None and calib == splits.spec else load_data_for(calib, model)
        config = StaticInt8(observer=observer)
        graph = quantize_static(model, calib_splits.train, config, example_inputs=calib_splits.example_inputs(1))
    else:
        if splits is None:
            raise ConfigError("--mode int8-dynamic needs --data: expected a data spec for the example input shape")
        config = DynamicInt8()
        graph = quantize_dynamic(model, config, example_inputs=splits.example_inputs(1))
    return graph, {"stage": "quantize", "config": config.to_dict(), "runtime": "onnxruntime"}, dict(graph.skipped)


def _sweep(path, sweep, data, plot, granularity, group_size, symmetric, rounding, trust_factory, json_output):
    from torchslim.artifact import load
    from torchslim.quantize import IntQuant
    from torchslim.quantize.sweep import sweep_bits

    if data is None:
        raise ConfigError("--sweep needs --data: expected a labelled data spec, e.g. --data digits")
    widths = parse_int_list("--sweep", sweep)
    base = IntQuant(granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding)
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

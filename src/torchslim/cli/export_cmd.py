"""``torchslim export``: a .slim model to an ONNX graph (fp32/fp16, int8 static/dynamic, 4-bit weight-only), or an
hf model to a Hugging Face directory (compressed-tensors for its int4/int8 layers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from torchslim.cli.common import (
    console,
    is_hf_model,
    is_hf_source,
    load_data_for,
    load_model_source,
    parse_int_list,
    print_json,
    table,
    text_example,
)
from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.export import ExportConfig

FORMATS = ("onnx", "hf")


def export(  # noqa: PLR0913 - Typer: each parameter is one command-line option
    path: Path = typer.Argument(..., help="Input .slim file, or hf:DIR (a local Hugging Face model directory)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx file (--format hf: a directory)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, or hf: a Hugging Face directory (compressed-tensors)."),
    dtype: str = typer.Option("float16", "--dtype", help="--format hf: float16, bfloat16 or float32."),
    quant: str = typer.Option("none", "--quant", help="none, int8-static, int8-dynamic or int4-weight."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (with --quant none)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration data spec (int8-static), e.g. digits."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec for the input shape and parity samples."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="One sample's shape, e.g. 1,28,28."),
    block_size: int = typer.Option(32, "--block-size", help="int4-weight block for layers ORT quantizes."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="MatMulNBits compute: 0-4 (4: int8)."),
    fuse: bool = typer.Option(False, "--fuse-transformer", help="ORT transformer fusion before quantizing."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: chosen for the runtime)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    text: Path | None = typer.Option(
        None, "--text", help="Token models (hf:DIR or a .slim made from one): texts, one per line, to trace and check "
        "with (default: one short sentence); the graph takes any batch and sequence length."),
) -> None:
    """Export a .slim model (or hf:DIR) to ONNX and check ONNX Runtime agrees with PyTorch (fails loudly if not)."""
    options = ExportOptions(
        path=path, out=out, fmt=fmt, dtype=dtype, quant=quant, precision=precision, calib=calib, data=data,
        input_shape=input_shape, block_size=block_size, accuracy_level=accuracy_level, fuse=fuse, opset=opset,
        text=text,
    )  # every flag is checked here, before anything is loaded or written
    run = _export_hf if options.fmt == "hf" else _export_onnx
    run(options, force=force, trust_factory=trust_factory, json_output=json_output)


@dataclasses.dataclass(frozen=True)
class ExportOptions(Config):
    """What ``torchslim export`` was asked to do, checked as a whole on construction.

    Fields are the command's options (``--format`` is ``fmt``, ``--fuse-transformer`` is ``fuse``). Errors name the
    flag, the value and what is allowed; the ONNX settings are checked by :class:`ExportConfig`.
    """

    path: Path
    out: Path
    fmt: str = "onnx"
    dtype: str = "float16"
    quant: str = "none"
    precision: str = "fp32"
    calib: str | None = None
    data: str | None = None
    input_shape: str | None = None
    block_size: int = 32
    accuracy_level: int = 4
    fuse: bool = False
    opset: int | None = None
    text: Path | None = None

    def validate(self) -> None:
        """Check the flags together; raise :class:`ConfigError` naming the first bad one."""
        if self.fmt not in FORMATS:
            raise ConfigError(f"--format = {self.fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
        if self.fmt == "hf":
            self._check_hf()
            return
        self.export_config()
        if self.quant == "int8-static" and self.calib is None:
            raise ConfigError("--quant int8-static needs --calib: expected a calibration data spec, e.g. --calib "
                              "digits")
        if self.input_shape:
            parse_int_list("--input-shape", self.input_shape)

    def _check_hf(self) -> None:
        from torchslim.export.hf import HF_DTYPES

        onnx_only = {"--quant": self.quant != "none", "--precision": self.precision != "fp32",
                     "--calib": self.calib is not None, "--data": self.data is not None,
                     "--input-shape": self.input_shape is not None}
        onnx_flags = [flag for flag, given in onnx_only.items() if given]
        if onnx_flags:
            raise ConfigError(f"{', '.join(onnx_flags)} is invalid with --format hf: the layers are written as they "
                              "are in the model (quantize it first, e.g. torchslim quantize hf:DIR --bits 4)")
        if self.dtype not in HF_DTYPES:
            raise ConfigError(f"--dtype = {self.dtype!r} is invalid: expected one of {', '.join(HF_DTYPES)}")

    def export_config(self) -> ExportConfig:
        """The ONNX export's settings (``--quant``, ``--precision``, ``--block-size``, ...)."""
        from torchslim.export import ExportConfig

        return ExportConfig(quant=self.quant, precision=self.precision, block_size=self.block_size,
                            accuracy_level=self.accuracy_level, transformer_fusion=self.fuse, opset=self.opset)


def _export_onnx(options: ExportOptions, *, force: bool, trust_factory: bool, json_output: bool) -> None:
    """``--format onnx``: export, check parity with ONNX Runtime, and print what was written."""
    import torch

    from torchslim.export import export as run_export
    from torchslim.fileio import check_output_path

    spec = options.calib or options.data
    path, input_shape = options.path, options.input_shape
    source = str(path) if is_hf_source(path) else path
    if is_hf_source(source):
        path = Path(str(source)[3:])  # the directory: output checks and the summary name it
    target = check_output_path(options.out, path, force=force)
    model, _, input_bytes = load_model_source(source, trust_factory=trust_factory)
    calib_data = example = None
    if is_hf_model(model):
        example = text_example(model, options.text, {"--data": options.data, "--calib": options.calib,
                                                     "--input-shape": input_shape})
    elif spec is None and input_shape is None and not (getattr(model, "_torchslim_input", None) or {}).get("shape"):
        raise ConfigError("--data, --calib or --input-shape is missing (the .slim records no input signature): "
                          "expected the model's input, e.g. --data digits")
    elif spec is not None:
        calib_data = load_data_for(spec, model).train
    else:
        recorded = model._torchslim_input["shape"] if input_shape is None else None
        shape = parse_int_list("--input-shape", input_shape) if input_shape else tuple(recorded)
        example = torch.randn((8, *shape), generator=torch.Generator().manual_seed(0))
    report = run_export(model, target, options.export_config(), example_inputs=example, calib_data=calib_data)
    summary = {"input": str(source), "input_bytes": input_bytes, **report.to_dict()}
    if json_output:
        print_json(summary)
        return
    parity = report.parity
    rows = [
        ["file bytes", f"{summary['input_bytes']:,}", f"{report.bytes:,}"],
        ["opset", "", str(report.opset)],
        ["parity max abs error", "", f"{parity['max_abs_error']:.3g}"],
        ["parity top-1 agreement", "", f"{parity['top1_agreement']:.2%}"],
        ["parity cosine", "", f"{parity['cosine']:.6f}"],
        ["operators", "", ", ".join(f"{op} x{n}" for op, n in sorted(report.op_types.items()))],
    ]
    out_console = console()
    label = options.quant if options.quant != "none" else options.precision
    out_console.print(table(f"export {path} -> {target} ({label}, {parity['samples']} parity samples)",
                            ["", ".slim", ".onnx"], rows))  # fmt: skip
    for note in report.notes:
        out_console.print(f"note: {note}")


def _export_hf(options: ExportOptions, *, force: bool, trust_factory: bool, json_output: bool) -> None:
    """``--format hf``: write the hf model (quantized layers in compressed-tensors) and check it reloads."""
    from torchslim.export.hf import export_hf
    from torchslim.fileio import check_output_path

    path, out, dtype = options.path, options.out, options.dtype
    source = str(path) if is_hf_source(path) else path
    check_output_path(out, Path(str(source)[3:]) if is_hf_source(source) else path, force=force)
    model, _, input_bytes = load_model_source(source, trust_factory=trust_factory)
    if not is_hf_model(model):
        raise ConfigError(f"--format hf is invalid for {str(path)!r}: it is not a Hugging Face model (hf:DIR or a "
                          ".slim made from one); expected --format onnx")
    # without --text, export_hf checks the reload on its own sentence
    example = text_example(model, options.text, {}) if options.text is not None else None
    report = export_hf(model, out, dtype=dtype, example_inputs=example, force=force)
    summary = {"input": str(source), "input_bytes": input_bytes, **report.to_dict()}
    if json_output:
        print_json(summary)
        return
    parity = report.parity
    formats = ", ".join(f"{fmt} x{n}" for fmt, n in report.formats.items()) or f"dense {dtype}"
    rows = [
        ["bytes", f"{input_bytes:,}", f"{report.bytes:,}"],
        ["format", "", formats],
        ["reload max abs error", "", f"{parity['max_abs_error']:.3g}"],
        ["reload top-1 agreement", "", f"{parity['top1_agreement']:.2%}"],
        ["reload cosine", "", f"{parity['cosine']:.6f}"],
    ]
    out_console = console()
    out_console.print(table(f"export {path} -> {report.directory} (Hugging Face, {dtype})", ["", "input", "output"],
                            rows))  # fmt: skip
    for note in report.notes:
        out_console.print(f"note: {note}")

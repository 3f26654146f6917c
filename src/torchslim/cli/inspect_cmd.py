"""``torchslim eval`` and ``torchslim inspect``: measure a .slim file, or show what it stores."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from torchslim.cli.common import console, load_data_for, parse_int_list, print_json, table

FILE_ARG = typer.Argument(..., help="A .slim file written by torchslim.")


def eval_(
    path: Path = FILE_ARG,
    data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, mnist:DIR, npz:FILE, imagefolder:DIR."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Batch sizes to time, comma-separated."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Time the model (adds a few seconds)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Intra-op threads for timing."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    text: Path | None = typer.Option(
        None, "--text", help="Language models (hf:DIR): fidelity to the original on this file, one text per line."
    ),
) -> None:
    """Measure a .slim model: accuracy, file bytes, parameters, MACs, latency, memory."""
    from torchslim.artifact import load
    from torchslim.measure import format_measurement, measure

    sizes = parse_int_list("--batch-sizes", batch_sizes)
    if text is not None:
        _eval_text(str(path), text, trust_factory, json_output)
        return
    model = load(path, trust_factory=trust_factory)
    splits = load_data_for(data, model)
    result = measure(model, splits, artifact_path=path, batch_sizes=sizes, latency=latency, num_threads=threads)
    if json_output:
        print_json({"file": str(path), "data": data, **result.to_dict()})
        return
    rows = [[name, value] for name, value in format_measurement(result)]
    console().print(table(f"{path} on {data}", ["metric", "value"], rows))


def _eval_text(source: str, text: Path, trust_factory: bool, json_output: bool) -> None:
    """``eval --text``: a .slim file (or hf:DIR) made from a Hugging Face model against its original, no labels."""
    from torchslim.hf import load_hf, read_texts, reference_model, text_fidelity

    texts = read_texts(text)  # checked before any model is loaded
    if source.startswith("hf:"):
        model, size = load_hf(source), None
    else:
        from torchslim.artifact import load

        model, size = load(source, trust_factory=trust_factory), os.path.getsize(source)
    result = {"file": source, "text": str(text), "bytes": size, **text_fidelity(model, reference_model(model), texts)}
    if json_output:
        print_json(result)
        return
    rows = [[key, "n/a" if value is None else value] for key, value in result.items() if key not in ("file", "text")]
    console().print(table(f"{source}: fidelity to the original on {text}", ["metric", "value"], rows))


def inspect(
    path: Path = FILE_ARG,
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a .slim file's manifest and per-tensor storage: shape, dtype, encoding, sparsity, bytes."""
    from torchslim.artifact import read_manifest, tensor_table

    manifest = read_manifest(path)
    tensors = tensor_table(path)
    summary = {
        "file": str(path),
        "bytes": os.path.getsize(path),
        "format_version": manifest.get("format_version"),
        "torchslim_version": manifest.get("torchslim_version"),
        "factory": manifest.get("factory"),
        "modules": manifest.get("modules", {}),
        "tensors": tensors,
        "recipe": manifest.get("recipe"),
        "measurements": manifest.get("measurements"),
    }
    if json_output:
        print_json(summary)
        return
    out = console()
    factory = summary["factory"] or {}
    out.print(
        f"[bold]{path}[/bold]: {summary['bytes']:,} bytes, format v{summary['format_version']}, "
        f"torchslim {summary['torchslim_version']}, factory {factory.get('name')} {factory.get('kwargs') or ''}"
    )
    rows = []
    for row in tensors:
        numel = max(int(row["numel"]), 1)
        sparsity = 1.0 - int(row["nonzero"]) / numel
        bits = 8 * int(row["stored_bytes"]) / numel
        rows.append(
            [
                row["name"],
                "x".join(str(d) for d in row["shape"]) or "scalar",
                row["dtype"],
                row["encoding"],
                f"{sparsity:.1%}",
                f"{int(row['stored_bytes']):,}",
                f"{bits:.2f}",
            ]
        )
    out.print(table("tensors", ["name", "shape", "dtype", "encoding", "sparsity", "bytes", "bits/elem"], rows))
    if summary["modules"]:
        module_rows = [[name, entry.get("codec"), entry.get("spec")] for name, entry in summary["modules"].items()]
        out.print(table("modules rebuilt on load", ["module", "codec", "spec"], module_rows))

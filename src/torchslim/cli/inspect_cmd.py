"""``torchslim inspect``: show what a .slim file stores."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from torchslim.cli.common import console, print_json, table

FILE_ARG = typer.Argument(..., help="A .slim file written by torchslim.")


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

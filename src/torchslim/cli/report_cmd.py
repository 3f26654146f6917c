"""``torchslim report DIR``: rebuild report.md, report.html and the plots from a run's saved measurements."""

from __future__ import annotations

from pathlib import Path

import typer

from torchslim.cli.common import console, print_json


def report(
    directory: Path = typer.Argument(..., help="Output directory of torchslim demo or torchslim compress."),
    json_output: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    """Rebuild the report of a demo or compress run from its saved measurements (nothing is re-run)."""
    from torchslim.pipeline.report import write_report

    files = write_report(directory)
    paths = {"markdown": str(files["markdown"]), "html": str(files["html"]),
             "plots": [str(p) for p in files["plots"]]}
    if json_output:
        print_json(paths)
    else:
        console().print(f"wrote {paths['markdown']}, {paths['html']} and {len(paths['plots'])} plot(s)")

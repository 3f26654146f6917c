"""``torchslim models``: list the registered reference models."""

from __future__ import annotations

import typer

from torchslim.cli.common import console, print_json, table


def models(json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the reference models that --model accepts (or use package.module:callable)."""
    from torchslim.models import list_models

    entries = list_models()
    if json_output:
        print_json(entries)
        return
    console().print(table("torchslim models", ["name", "description"], [[k, v] for k, v in entries.items()]))

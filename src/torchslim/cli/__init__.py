"""The ``torchslim`` command line (Typer + Rich)."""

"""``python -m torchslim ...`` runs the CLI (also under ``torchrun -m torchslim ...``)."""

from torchslim.cli.main import entry

if __name__ == "__main__":
    entry()

"""Entry point of the ``torchslim`` command: the Typer app and the error policy.

User errors (bad flags, bad values, missing or corrupted files) print one line ``error: ...`` on
stderr and exit with code 2; ``--verbose`` adds the traceback. Bugs still show a traceback.

Progress (:mod:`torchslim.progress`) goes to stderr while a command runs: a bar with ETA on a terminal, one line
per epoch or stage otherwise; ``--quiet`` (anywhere on the line, like ``--verbose``) turns it off. It is one
global option rather than one per command so every long-running command honours it, including those whose
progress comes from deep inside the library (synthesis, QAT, deploy).
"""

from __future__ import annotations

import sys
import traceback

import typer

from torchslim import progress
from torchslim._version import __version__
from torchslim.cli import (
    bench_cmd,
    compress_cmd,
    deploy_cmd,
    distill_cmd,
    eval_cmd,
    export_cmd,
    fuse_cmd,
    inspect_cmd,
    models_cmd,
    prune_cmd,
    quantize_cmd,
    report_cmd,
    run_cmd,
)
from torchslim.errors import TorchSlimError

app = typer.Typer(
    name="torchslim",
    help="Compress and accelerate PyTorch models; every claim measured on the real artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERRORS = (TorchSlimError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"torchslim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors (anywhere on the line)."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bars or progress lines on stderr (anywhere on the line)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """torchslim: quantization, pruning and distillation with measured results."""
    if quiet:  # main() strips --quiet itself; this serves callers of the Typer app
        progress.configure("off")


app.command("demo")(run_cmd.demo)
app.command("train")(run_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("inspect")(inspect_cmd.inspect)
app.command("models")(models_cmd.models)
app.command("quantize")(quantize_cmd.quantize)
app.command("prune")(prune_cmd.prune)
app.command("export")(export_cmd.export)
app.command("bench")(bench_cmd.bench)
app.command("deploy")(deploy_cmd.deploy)
app.command("fuse")(fuse_cmd.fuse)
app.command("compress")(compress_cmd.compress)
app.command("report")(report_cmd.report)
app.command("distill")(distill_cmd.distill)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn user errors into a one-line message with exit code 2.

    Args:
        argv: arguments without the program name (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit code (also used by ``sys.exit`` when run as a script).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # --verbose and --quiet are accepted anywhere on the line (before or after the command name).
    verbose = any(a in ("--verbose", "-v") for a in args)
    quiet = any(a in ("--quiet", "-q") for a in args)
    args = [a for a in args if a not in ("--verbose", "-v", "--quiet", "-q")]
    try:
        # Standalone mode: Typer itself reports usage errors (exit 2) and --help/--version (exit 0)
        # through SystemExit; our own errors propagate to the handler below.
        with progress.reporting("off" if quiet else "auto"):
            app(args=args, prog_name="torchslim", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except USER_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)) and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()

"""Helpers shared by the CLI commands: console, JSON output, tables, option parsing."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from torchslim.errors import ConfigError

PROGRESS_OPT = typer.Option(
    None, "--progress/--no-progress",
    help="Progress on stderr for this command (default: a bar with ETA on a terminal, one line per epoch or stage "
    "otherwise; none with the global --quiet).")


def console() -> Console:
    """A Rich console on stdout (plain text, 160 columns wide, when stdout is not a terminal)."""
    return Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 160)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, nothing else (for scripts)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def parse_int_list(option: str, text: str) -> tuple[int, ...]:
    """Parse ``"1,32"`` into ``(1, 32)``.

    Args:
        option: the option name, for the error message (``--batch-sizes``).
        text: comma-separated positive integers.

    Returns:
        The integers in order.

    Raises:
        ConfigError: if an item is not a positive integer.
    """
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"{option} = {text!r} is invalid: expected comma-separated positive integers, e.g. 1,32")
        values.append(int(item))
    return tuple(values)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """Build a Rich table with right-aligned columns after the first."""
    result = Table(title=title, title_justify="left")
    for index, name in enumerate(columns):
        result.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        result.add_row(*[str(cell) for cell in row])
    return result


def load_data_for(spec: str, model):
    """Load a data spec and check the model accepts its inputs (before any work is done).

    Args:
        spec: a data spec (``digits``, ``npz:FILE`` ...).
        model: the model that will run on it.

    Returns:
        The ``DataSplits``.

    Raises:
        DataError: bad spec, or inputs/classes the model does not fit.
    """
    from torchslim.data import load_data
    from torchslim.models.compat import check_model_data

    splits = load_data(spec)
    check_model_data(model, splits.example_inputs(1), splits.num_classes, spec)
    return splits


def holdout_accuracy(model, splits) -> float | None:
    """Top-1 accuracy on the test split, or None when no data was given."""
    if splits is None:
        return None
    from torchslim.measure import accuracy

    return accuracy(model, splits.test)


def is_hf_source(source: object) -> bool:
    """True for a ``hf:DIR`` model argument (a local Hugging Face directory) rather than a ``.slim`` file."""
    return str(source).startswith("hf:")


def load_model_source(source, *, trust_factory: bool = False, lazy: bool = False) -> tuple[Any, list, int]:
    """Load a ``.slim`` file or a ``hf:DIR`` model given on the command line.

    Args:
        source: the path of a ``.slim`` file, or ``hf:DIR``.
        trust_factory: allow a ``.slim`` model factory outside torchslim.
        lazy: ``hf:DIR``: leave the decoder blocks in their file until needed (``load_hf(lazy=True)``).

    Returns:
        ``(model, recipe so far, input bytes)``; for ``hf:DIR`` the recipe is empty and the bytes are those of
        the directory's weight files (``*.safetensors``, ``*.bin``).
    """
    from pathlib import Path

    if is_hf_source(source):
        from torchslim.hf import load_hf
        from torchslim.hf.loading import model_dir

        model = load_hf(str(source), lazy=lazy)
        files = [f for pattern in ("*.safetensors", "*.bin") for f in model_dir(str(source)).glob(pattern)]
        return model, [], sum(f.stat().st_size for f in files)
    from torchslim.artifact import load, read_manifest

    path = Path(source)
    model = load(path, trust_factory=trust_factory)
    return model, list(read_manifest(path).get("recipe") or []), path.stat().st_size


def is_hf_model(model) -> bool:
    """True for a model loaded from a Hugging Face directory (``HFModel``)."""
    from torchslim.hf.loading import HFModel

    return isinstance(model, HFModel)


def no_image_data(option: str, value) -> None:
    """Refuse an image-data option for a ``hf:DIR`` model (it takes token ids: ``--text FILE``).

    Raises:
        ConfigError: ``value`` is set.
    """
    if value:
        raise ConfigError(f"{option} = {value!r} is invalid for a Hugging Face model (hf:DIR), which takes token ids: "
                          "expected --text FILE (one text per line) instead")


def text_example(model, text, image_options: dict[str, object]):
    """Example token inputs for a Hugging Face model from ``--text FILE`` (one short sentence without it).

    Args:
        model: an ``HFModel`` with a tokenizer.
        text: the ``--text`` file, or None.
        image_options: image-data options given on the command line (``{"--data": value, ...}``).

    Returns:
        ``(input_ids, attention_mask)``.

    Raises:
        ConfigError: an image-data option was given.
    """
    from torchslim.hf import read_texts

    if any(value is not None for value in image_options.values()):
        raise ConfigError(f"{'/'.join(image_options)} are for image models: a Hugging Face model takes token ids; "
                          "give texts with --text FILE (or nothing: one short sentence)")
    return token_inputs(model, read_texts(text) if text is not None else None)


def token_inputs(model, texts: list[str] | None, *, max_length: int = 128):
    """Example ``(input_ids, attention_mask)`` for a Hugging Face model, made by its tokenizer.

    Args:
        model: an ``HFModel`` with a tokenizer.
        texts: texts to encode (at most 64 are used); None: one short sentence.
        max_length: tokens per text at most.

    Returns:
        ``(input_ids, attention_mask)`` int64 tensors.
    """
    from torchslim.hf import encode

    return encode(model, list(texts or ["torchslim compresses models."])[:64], max_length=max_length)

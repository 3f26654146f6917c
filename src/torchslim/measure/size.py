"""Model size: logical parameter counts, nonzeros, storage bits, and the saved artifact's bytes.

A module may describe itself with ``slim_stats() -> {"parameters", "nonzero", "storage_bits"}``
(packed quantized layers do, because their weights live in uint8 buffers, not parameters); it is
then counted as declared and its children are not visited. Every other module contributes its own
(non-recursive) parameters; a parameter shared by several modules is counted once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from torchslim.artifact import save
from torchslim.errors import ModelError

_STAT_KEYS = ("parameters", "nonzero", "storage_bits")


def parameter_stats(model: nn.Module) -> dict[str, int]:
    """Count the logical parameters of ``model``.

    Args:
        model: any module; submodules with ``slim_stats()`` report themselves.

    Returns:
        ``{"parameters", "nonzero", "fp32_bytes", "storage_bits"}``: parameter count, nonzero count,
        the bytes the same parameters take as float32 (``4 * parameters``) and the bits they take in
        memory as stored (``numel * element_size * 8``, or the module's declared ``storage_bits``).

    Raises:
        ModelError: if a ``slim_stats()`` result lacks a key or holds a negative count.
    """
    totals = dict.fromkeys(_STAT_KEYS, 0)
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        stats = getattr(module, "slim_stats", None)
        if callable(stats):
            for key, value in _checked_stats(stats(), name or type(module).__name__).items():
                totals[key] += value
            return
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            totals["parameters"] += param.numel()
            totals["nonzero"] += int(torch.count_nonzero(param.detach()))
            totals["storage_bits"] += param.numel() * param.element_size() * 8
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return {
        "parameters": totals["parameters"],
        "nonzero": totals["nonzero"],
        "fp32_bytes": 4 * totals["parameters"],
        "storage_bits": totals["storage_bits"],
    }


def _checked_stats(stats: object, name: str) -> dict[str, int]:
    if not isinstance(stats, dict) or any(key not in stats for key in _STAT_KEYS):
        raise ModelError(
            f"{name}.slim_stats() returned {stats!r}: expected a dict with keys {', '.join(_STAT_KEYS)}"
        )
    out = {key: int(stats[key]) for key in _STAT_KEYS}
    if any(value < 0 for value in out.values()):
        raise ModelError(f"{name}.slim_stats() returned negative counts: {out}")
    return out


@contextlib.contextmanager
def saved_artifact(model: nn.Module) -> Iterator[Path]:
    """Save ``model`` with ``torchslim.artifact.save`` into a temporary directory; yield the file path.

    The directory and file are removed when the block ends.

    Args:
        model: the model to save.

    Yields:
        Path of the saved ``.slim`` file.

    Raises:
        Whatever ``torchslim.artifact.save`` raises (e.g. a model that cannot be serialised).
    """
    with tempfile.TemporaryDirectory(prefix="torchslim-measure-") as directory:
        path = Path(directory) / "model.slim"
        save(model, path)
        yield path


def artifact_bytes(model: nn.Module) -> int:
    """Return the size in bytes of ``model`` saved as a ``.slim`` file (saved to a temp dir, then removed).

    Args:
        model: the model to save.

    Returns:
        The file size from ``os.path.getsize``.

    Raises:
        Whatever ``torchslim.artifact.save`` raises.
    """
    with saved_artifact(model) as path:
        return os.path.getsize(path)

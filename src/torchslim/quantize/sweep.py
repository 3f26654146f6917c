"""Choosing a bit width (the seed's first step): quantize at several widths and measure each."""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.artifact import save
from torchslim.errors import ConfigError
from torchslim.measure.accuracy import accuracy
from torchslim.measure.plots import plot_accuracy_vs_size
from torchslim.measure.size import parameter_stats
from torchslim.quantize.api import IntQuant, quantize_


@dataclasses.dataclass
class SweepRow:
    """One bit width: accuracy, the saved file's bytes, and file bits per parameter.

    ``bits_per_weight`` is ``8 * file_bytes / parameters``: everything in the file counts (scales,
    zero points, biases, the manifest), so it is slightly above the nominal width.
    """

    label: str
    bits: int | None
    accuracy: float
    file_bytes: int
    bits_per_weight: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


def sweep_bits(
    model: nn.Module,
    data: Any,
    bits: Sequence[int],
    base: IntQuant = IntQuant(),
    *,
    plot_path: str | os.PathLike | None = None,
) -> list[SweepRow]:
    """Quantize a copy of ``model`` at each bit width, save it, and measure accuracy and bytes.

    Args:
        model: the float model (unchanged), built by ``create_model`` so it can be saved.
        data: labelled evaluation data (``DataSplits`` -> test split).
        bits: widths to try, each 2..8.
        base: the other ``IntQuant`` settings (granularity, group size, rounding ...).
        plot_path: if given, write an accuracy-vs-size PNG there (fp32 included).

    Returns:
        The fp32 row first, then one row per width in the given order.

    Raises:
        ConfigError: an empty list or a width outside 2..8.
    """
    if not bits:
        raise ConfigError("bits = [] is invalid: expected at least one width in [2, 8]")
    configs = [base.replace(bits=b) for b in bits]  # validates every width before any work
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def saved_bytes(candidate: nn.Module, name: str) -> int:
            path = Path(tmp) / f"{name}.slim"
            save(candidate, path)
            return path.stat().st_size

        params = parameter_stats(model)["parameters"]
        fp32_bytes = saved_bytes(model, "fp32")
        rows.append(SweepRow("fp32", None, accuracy(model, data), fp32_bytes, 8 * fp32_bytes / params))
        for config in configs:
            trial = copy.deepcopy(model)
            quantize_(trial, config)
            size = saved_bytes(trial, f"int{config.bits}")
            rows.append(SweepRow(f"{config.bits}-bit", config.bits, accuracy(trial, data), size, 8 * size / params))
    if plot_path is not None:
        plot_accuracy_vs_size(
            [r.label for r in rows],
            [r.file_bytes for r in rows],
            [r.accuracy for r in rows],
            plot_path,
            title="accuracy vs file size by bit width",
        )
    return rows

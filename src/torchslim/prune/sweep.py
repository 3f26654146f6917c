"""Choosing a threshold (the seed's first step): prune at several tau and measure each result."""

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
from torchslim.fileio import atomic_path
from torchslim.measure.accuracy import accuracy
from torchslim.measure.plots import plot_accuracy_vs_size
from torchslim.prune.api import MagnitudePruning, finalize_, layer_sparsity, prunable_layers, prune_


@dataclasses.dataclass
class ThresholdRow:
    """One threshold: sparsity, the saved (finalized) file's bytes, accuracy, and sparsity per layer.

    Attributes:
        label: ``"fp32"`` for the unpruned model, else ``"tau=..."``.
        threshold: tau (None for the unpruned row).
        sparsity: zeros / elements over the prunable layers' weights.
        file_bytes: bytes of the ``.slim`` file the finalized model is saved as.
        accuracy: top-1 accuracy on the evaluation data.
        layers: layer name -> sparsity of its weight.
    """

    label: str
    threshold: float | None
    sparsity: float
    file_bytes: int
    accuracy: float
    layers: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


def sweep_thresholds(
    model: nn.Module,
    data: Any,
    thresholds: Sequence[float],
    *,
    scope: str = "global",
    criterion: str = "l1",
    plot_path: str | os.PathLike | None = None,
    size_plot_path: str | os.PathLike | None = None,
) -> list[ThresholdRow]:
    """Prune a copy of ``model`` at each threshold by the seed's rule, save it, and measure it.

    With a fixed tau every scope applies the same rule ``score > tau`` (``|W| > tau`` for ``l1``), so the
    scope only names the config a user would apply with the chosen tau.

    Args:
        model: the float model (unchanged), built by ``create_model`` so it can be saved.
        data: labelled evaluation data (``DataSplits`` -> test split; its train split feeds ``taylor``).
        thresholds: the tau values to try (>= 0), e.g. ``[0.01, 0.02, 0.05, 0.1]``.
        scope: ``"global"``, ``"layer"`` or ``"neuron"`` (see :class:`MagnitudePruning`).
        criterion: ``"l1"`` (``|w|``, the seed's rule), ``"l2"`` or ``"taylor"``.
        plot_path: if given, write a PNG of accuracy and sparsity against tau there (two y axes).
        size_plot_path: if given, write an accuracy-vs-file-size PNG there (fp32 included).

    Returns:
        The fp32 row first, then one row per threshold in the given order.

    Raises:
        ConfigError: an empty list, or an invalid threshold, scope or criterion.
    """
    if not thresholds:
        raise ConfigError("thresholds = [] is invalid: expected at least one threshold >= 0")
    configs = [MagnitudePruning(scope=scope, threshold=t, criterion=criterion) for t in thresholds]  # validates all
    base = copy.deepcopy(model)
    finalize_(base)  # a model that still carries masks is measured as it computes
    names = list(prunable_layers(base)[0])
    rows: list[ThresholdRow] = []
    with tempfile.TemporaryDirectory() as tmp:

        def row(candidate: nn.Module, label: str, tau: float | None) -> ThresholdRow:
            path = Path(tmp) / "candidate.slim"
            save(candidate, path)
            table = layer_sparsity(candidate)
            numel = sum(table[n]["numel"] for n in names)
            zeros = sum(table[n]["zeros"] for n in names)
            return ThresholdRow(label, tau, zeros / numel, path.stat().st_size, accuracy(candidate, data),
                                {n: table[n]["sparsity"] for n in names})

        rows.append(row(base, "fp32", None))
        for config in configs:
            trial = copy.deepcopy(base)
            prune_(trial, config, data=getattr(data, "train", data))
            finalize_(trial)
            rows.append(row(trial, f"tau={config.threshold:g}", float(config.threshold)))
    if plot_path is not None:
        plot_threshold_sweep(rows, plot_path)
    if size_plot_path is not None:
        plot_accuracy_vs_size([r.label for r in rows], [r.file_bytes for r in rows], [r.accuracy for r in rows],
                              size_plot_path, title="accuracy vs file size by pruning threshold")
    return rows


def plot_threshold_sweep(rows: Sequence[ThresholdRow], path: str | os.PathLike) -> Path:
    """Plot accuracy (left axis) and sparsity (right axis) against tau; the fp32 accuracy as a dashed line.

    Args:
        rows: rows of :func:`sweep_thresholds` (the row without a threshold is the reference).
        path: PNG to write (atomically).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((r for r in rows if r.threshold is not None), key=lambda r: r.threshold)
    taus = [r.threshold for r in points]
    figure, left = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    right = left.twinx()
    left.plot(taus, [r.accuracy * 100 for r in points], "o-", color="tab:blue", label="accuracy")
    right.plot(taus, [r.sparsity * 100 for r in points], "s--", color="tab:orange", label="sparsity")
    for reference in (r for r in rows if r.threshold is None):
        left.axhline(reference.accuracy * 100, color="tab:blue", alpha=0.4, linestyle=":", label="unpruned accuracy")
    if taus and min(taus) > 0 and max(taus) / min(taus) >= 10:
        left.set_xscale("log")
    left.set_xlabel("threshold tau (weights scoring <= tau are pruned)")
    left.set_ylabel("top-1 accuracy (%)", color="tab:blue")
    right.set_ylabel("sparsity (%)", color="tab:orange")
    right.set_ylim(0, 100)
    left.set_title("accuracy and sparsity vs threshold")
    left.grid(True, alpha=0.3)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower left", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)

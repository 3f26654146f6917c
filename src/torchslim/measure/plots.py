"""PNG plots for reports (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torchslim.fileio import atomic_path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: smaller size (x) and higher accuracy (y).

    Args:
        points: ``(size, accuracy)`` pairs.

    Returns:
        Indices of the Pareto-optimal points, sorted by size.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for index in order:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def plot_accuracy_vs_size(
    labels: Sequence[str],
    sizes: Sequence[float],
    accuracies: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str = "accuracy vs file size",
) -> Path:
    """Scatter accuracy against file bytes, label each point, draw the Pareto front.

    Args:
        labels: one label per point (e.g. ``"4-bit"``).
        sizes: file sizes in bytes.
        accuracies: accuracies in ``[0, 1]``.
        path: PNG to write (atomically).
        title: plot title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    kib = [s / 1024 for s in sizes]
    pct = [a * 100 for a in accuracies]
    axes.scatter(kib, pct, color="tab:blue", zorder=3)
    for label, x, y in zip(labels, kib, pct, strict=True):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(list(zip(sizes, accuracies, strict=True)))
    axes.plot([kib[i] for i in front], [pct[i] for i in front], color="tab:orange", label="Pareto front", zorder=2)
    axes.set_xscale("log")
    axes.set_xlabel("file bytes (KiB, log scale)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)

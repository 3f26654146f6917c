"""PNG plots for reports (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torchslim.fileio import atomic_path


def _new_figure():
    """``(pyplot, figure, axes)`` of one headless (Agg) figure in the size every plot here uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    return plt, figure, axes


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
    plt, figure, axes = _new_figure()
    kib = [s / 1024 for s in sizes]
    pct = [a * 100 for a in accuracies]
    axes.scatter(kib, pct, color="tab:blue", zorder=3)
    front = pareto_front(list(zip(sizes, accuracies, strict=True)))
    axes.plot([kib[i] for i in front], [pct[i] for i in front], color="tab:orange", label="Pareto front", zorder=2)
    axes.set_xscale("log")
    axes.set_xlabel("file bytes (KiB, log scale)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    _place_labels(figure, axes, labels, kib, pct)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)


# Offsets (points) tried in turn for a point's label; the first whose box overlaps no label placed before is used.
_LABEL_OFFSETS = [(4, 4), (4, -11), (-4, 4), (-4, -11), (4, 15), (4, -22), (-4, 15), (-4, -22), (4, 26), (4, -33)]


def _place_labels(figure, axes, labels: Sequence[str], xs: Sequence[float], ys: Sequence[float]) -> list:
    """Annotate each point with its label where it overlaps no label placed before (points near each other, e.g.
    two quantized variants of one size, would otherwise print on top of each other); returns the annotations."""
    renderer = figure.canvas.get_renderer()
    placed, texts = [], []
    for label, x, y in sorted(zip(labels, xs, ys, strict=True), key=lambda item: (item[1], -item[2])):
        text = None
        for dx, dy in _LABEL_OFFSETS:
            if text is not None:
                text.remove()
            text = axes.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                 ha="left" if dx > 0 else "right", arrowprops=None if abs(dy) < 12 else
                                 {"arrowstyle": "-", "color": "0.6", "lw": 0.5})
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(text.get_window_extent(renderer))
        texts.append(text)
    return texts


def plot_accuracy_vs_bits(
    bits: Sequence[int],
    accuracies: Sequence[float],
    sizes: Sequence[float],
    path: str | os.PathLike,
    *,
    reference: float | None = None,
    title: str = "accuracy vs bits per weight",
) -> Path:
    """Plot accuracy (left axis) and file size (right axis) against the weight bit width.

    Args:
        bits: bit widths (x).
        accuracies: accuracies in ``[0, 1]``.
        sizes: file bytes at each width.
        path: PNG to write (atomically).
        reference: the float model's accuracy, drawn as a dotted line.
        title: plot title.

    Returns:
        The written path.
    """
    plt, figure, left = _new_figure()
    order = sorted(range(len(bits)), key=lambda i: bits[i])
    xs = [bits[i] for i in order]
    right = left.twinx()
    left.plot(xs, [accuracies[i] * 100 for i in order], "o-", color="tab:blue", label="accuracy")
    right.plot(xs, [sizes[i] / 1024 for i in order], "s--", color="tab:orange", label="file KiB")
    if reference is not None:
        left.axhline(reference * 100, color="tab:blue", alpha=0.4, linestyle=":", label="fp32 accuracy")
    left.set_xticks(xs)
    left.set_xlabel("bits per weight")
    left.set_ylabel("top-1 accuracy (%)", color="tab:blue")
    right.set_ylabel("file size (KiB)", color="tab:orange")
    left.set_title(title)
    left.grid(True, alpha=0.3)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)


def plot_explored(
    sizes: Sequence[float],
    accuracies: Sequence[float],
    path: str | os.PathLike,
    *,
    chosen: int | None = None,
    floor: float | None = None,
    title: str = "explored candidates",
) -> Path:
    """Scatter many candidates (accuracy vs file bytes), draw their Pareto front, mark the chosen one.

    Args:
        sizes: file bytes per candidate.
        accuracies: accuracies in ``[0, 1]``.
        path: PNG to write (atomically).
        chosen: index of the selected candidate (drawn as a star), or None.
        floor: the accuracy budget (a dashed horizontal line), or None.
        title: plot title.

    Returns:
        The written path.
    """
    plt, figure, axes = _new_figure()
    kib = [s / 1024 for s in sizes]
    pct = [a * 100 for a in accuracies]
    axes.scatter(kib, pct, color="tab:blue", alpha=0.6, s=18, label="candidates", zorder=3)
    front = pareto_front(list(zip(sizes, accuracies, strict=True)))
    axes.plot([kib[i] for i in front], [pct[i] for i in front], color="tab:orange", label="Pareto front", zorder=2)
    if floor is not None:
        axes.axhline(floor * 100, color="tab:red", linestyle="--", alpha=0.6, label="accuracy budget")
    if chosen is not None:
        axes.scatter([kib[chosen]], [pct[chosen]], marker="*", s=220, color="tab:green", label="chosen", zorder=4)
    axes.set_xscale("log")
    axes.set_xlabel("file bytes (KiB, log scale)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)

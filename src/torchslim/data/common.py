"""Pieces shared by the data loaders: the array bundle, the stratified split, normalisation, checks.

Loaders raise :class:`DataError` with messages that do not repeat the spec; ``load_data`` adds the
``data spec '...':`` prefix, so every message names the spec exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torchslim.errors import DataError


@dataclass
class Arrays:
    """What a loader returns: both splits as tensors plus what ``DataSplits`` records about them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None

    def clone(self) -> Arrays:
        """Return a copy whose tensors share no memory with this one (for cached results)."""
        return Arrays(
            self.x_train.clone(), self.y_train.clone(), self.x_test.clone(), self.y_test.clone(),
            self.num_classes, self.mean, self.std, self.classes,
        )


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test, keeping class proportions (seeded, reproducible).

    Args:
        y: integer labels, one per sample.
        test_fraction: share of samples that go to the test split, in (0, 1).
        seed: ``random_state`` for ``sklearn.model_selection.train_test_split``.
        class_names: names used in messages instead of label numbers.

    Returns:
        ``(train_indices, test_indices)`` in the order ``train_test_split`` gives them.

    Raises:
        DataError: a class has a single sample, or the split leaves a side without every class.
    """
    from sklearn.model_selection import train_test_split  # scikit-learn is slow to import

    labels, counts = np.unique(y, return_counts=True)
    if (counts < 2).any():
        label = int(labels[counts < 2][0])
        name = repr(class_names[label]) if class_names is not None else str(label)
        raise DataError(
            f"class {name} has a single sample; expected at least 2 per class to make a stratified "
            "train/test split (add samples or provide a separate test set)"
        )
    n = len(y)
    # Same arithmetic as scikit-learn, checked here to give a message that says what to change.
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if min(n_test, n_train) < len(labels):
        raise DataError(
            f"test_fraction={test_fraction} splits {n} samples into {n_train} train and {n_test} test; "
            f"expected at least one sample of each of the {len(labels)} classes on both sides"
        )
    try:
        train_idx, test_idx = train_test_split(
            np.arange(n), test_size=test_fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise DataError(f"cannot split {n} samples with test_fraction={test_fraction}: {exc}") from exc
    return np.asarray(train_idx), np.asarray(test_idx)


def _channel_view(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.reshape(1, -1, *([1] * (x.ndim - 2)))


def normalise_by_train(
    x_train: torch.Tensor, x_test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """Standardise both splits per channel (dim 1) with mean/std measured on the train split only.

    Args:
        x_train: float tensor (N, C, ...).
        x_test: float tensor (M, C, ...).

    Returns:
        ``(x_train, x_test, mean, std)``; new float32 tensors and per-channel statistics. A channel
        with zero spread gets std 1 so it is only shifted.
    """
    dims = [0, *range(2, x_train.ndim)]
    wide = x_train.double()
    mean = wide.mean(dim=dims)
    std = wide.std(dim=dims, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean_t, std_t = mean.float(), std.float()
    return (
        normalise_fixed(x_train, mean_t, std_t),
        normalise_fixed(x_test, mean_t, std_t),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
    )


def normalise_fixed(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Return ``(x - mean) / std`` with per-channel ``mean``/``std`` broadcast over dim 1."""
    return ((x - _channel_view(mean, x)) / _channel_view(std, x)).float()


def check_finite(x: np.ndarray | torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` if floating-point data holds NaN or Inf.

    Args:
        x: array or tensor; integer data always passes.
        what: how the message names the data (``"array 'x'"``, ``"file '/d/a'"``).

    Raises:
        DataError: naming ``what`` and how many values are not finite.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            return
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    else:
        if not x.is_floating_point():
            return
        bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DataError(f"{what} contains {bad} NaN/Inf value(s); expected finite numbers")

"""Helpers shared by the measurement modules: batches, inputs on a device, calls (modes, logits: torchslim._utils)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torchslim.errors import DataError


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move a tensor, or a tuple/list of tensors, to ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(item, device) for item in inputs)
    return inputs


def first_samples(inputs: Any, n: int = 1) -> Any:
    """Slice the first ``n`` samples of a tensor, or of each tensor in a tuple/list."""
    if isinstance(inputs, Tensor):
        return inputs[:n]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_samples(item, n) for item in inputs)
    raise DataError(f"example inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")


def call(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on one tensor or unpack a tuple/list of tensors as positional arguments."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def unwrap_splits(data: Any) -> Any:
    """Return ``data.test`` for a ``DataSplits``-like object, ``data`` unchanged otherwise."""
    if isinstance(data, (Tensor, Dataset, DataLoader)) or data is None:
        return data
    if hasattr(data, "test"):
        return data.test
    return data


def iter_batches(data: Any, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(inputs, targets_or_None)`` batches from a tensor, dataset, loader or ``DataSplits``.

    Args:
        data: a tensor of inputs, a ``Dataset`` of ``(x, y)`` or ``(x,)`` samples, a ``DataLoader``,
            or an object with a ``.test`` dataset.
        batch_size: batch size used for tensors and datasets (a loader keeps its own).

    Yields:
        Input batches with their targets (``None`` when the data has no labels).

    Raises:
        DataError: for a non-positive batch size or an unsupported data type.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size = {batch_size!r} is invalid: expected an integer >= 1")
    data = unwrap_splits(data)
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0] if data.dim() else 0, batch_size):
            yield data[start : start + batch_size], None
        return
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, DataLoader):
        raise DataError(
            f"cannot read batches from {type(data).__name__}: expected a Tensor of inputs, a Dataset, "
            "a DataLoader or DataSplits"
        )
    for batch in data:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and batch:
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            raise DataError(
                f"a batch must be a tensor or an (inputs, targets) pair, got {type(batch).__name__}"
            )


def first_input(data: Any) -> Tensor | None:
    """Return the first input sample of ``data`` as a batch of one, or ``None`` if there is none."""
    if data is None:
        return None
    for inputs, _ in iter_batches(data, batch_size=1):
        return inputs[:1]
    return None

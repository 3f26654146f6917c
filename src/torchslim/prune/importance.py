"""Element scores for unstructured pruning: magnitude (L1 / L2) and first-order Taylor.

The seed's rule ``W' = W if |W| > tau else 0`` is the L1 criterion with a threshold. Scores are
computed on the layer's current effective weight, so repeated pruning builds on earlier masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim._utils import eval_mode
from torchslim.errors import DataError

CRITERIA = ("l1", "l2", "taylor")
TAYLOR_BATCHES = 4  # batches of data whose gradients feed Taylor importance (unstructured and structural)
TAYLOR_BATCH_SIZE = 64  # the batch size a Dataset is read with


def labelled_batches(data: Any, what: str) -> Iterator[tuple[Any, Any]]:
    """The first :data:`TAYLOR_BATCHES` ``(inputs, targets)`` batches of ``data`` for a Taylor importance.

    Args:
        data: a ``DataLoader`` or ``Dataset`` of ``(inputs, targets)``, or ``DataSplits`` (its train split).
        what: the caller, named in errors (``"criterion 'taylor'"``).

    Returns:
        An iterator over at most ``TAYLOR_BATCHES`` batches.

    Raises:
        DataError: no data, data of another type, a batch that is not ``(inputs, targets)``, or no batch at all.
    """
    if data is None:
        raise DataError(f"{what} needs data: pass data=... (labelled batches)")
    source = getattr(data, "train", data)
    if isinstance(source, Dataset) and not isinstance(source, DataLoader):
        source = DataLoader(source, batch_size=TAYLOR_BATCH_SIZE, shuffle=False)
    if not isinstance(source, DataLoader):
        raise DataError(f"{what}: data is a {type(data).__name__}: expected a DataLoader, a Dataset of "
                        "(inputs, targets) or DataSplits")
    seen = 0
    for batch in source:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DataError(f"{what}: data must yield (inputs, targets) batches")
        yield batch[0], batch[1]
        seen += 1
        if seen >= TAYLOR_BATCHES:
            return
    if not seen:
        raise DataError(f"{what}: the data yielded no batch; expected labelled (inputs, targets)")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the next forward will see it.

    With a ``torch.nn.utils.prune`` mask attached, ``module.weight`` is only recomputed in a forward
    pre-hook, so after an optimizer step it is stale; ``weight_orig * weight_mask`` is current.
    """
    orig = getattr(module, "weight_orig", None)
    return module.weight if orig is None else orig * module.weight_mask


def magnitude_scores(weight: torch.Tensor, criterion: str) -> torch.Tensor:
    """``|w|`` for ``"l1"`` (the seed's rule) or ``w**2`` for ``"l2"``."""
    data = weight.detach().float()
    return data.abs() if criterion == "l1" else data.pow(2)


def taylor_scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: Any,
    *,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``|w * dL/dw|`` summed over :data:`TAYLOR_BATCHES` batches (Molchanov 2019).

    Args:
        model: the model (its train/eval mode and gradients are restored/cleared afterwards).
        layers: name -> module whose ``weight`` gets a score.
        data: a ``DataLoader`` or ``Dataset`` of ``(inputs, targets)``, or ``DataSplits`` (train split).
        loss_fn: ``loss_fn(model, inputs, targets)``; cross-entropy by default.

    Returns:
        name -> score tensor shaped like the weight.

    Raises:
        DataError: if no data is given or it yields no batch.
    """
    scores = {name: torch.zeros_like(module.weight, dtype=torch.float32) for name, module in layers.items()}
    # eval mode: the importance of the deployed function (BatchNorm uses running statistics)
    with eval_mode(model):
        try:
            for inputs, targets in labelled_batches(data, "criterion 'taylor'"):
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, inputs, targets) if loss_fn else F.cross_entropy(model(inputs), targets)
                loss.backward()
                for name, module in layers.items():
                    grad = _weight_grad(module)
                    if grad is not None:
                        scores[name] += (effective_weight(module).detach() * grad).abs().float()
        finally:
            model.zero_grad(set_to_none=True)
    return scores


def _weight_grad(module: nn.Module) -> torch.Tensor | None:
    """Gradient of the effective weight (``weight_orig`` when a pruning mask is attached)."""
    orig = getattr(module, "weight_orig", None)
    if orig is not None:
        return None if orig.grad is None else orig.grad * module.weight_mask
    return module.weight.grad

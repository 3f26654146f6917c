"""Element scores for unstructured pruning: magnitude (L1 / L2) and first-order Taylor.

The seed's rule ``W' = W if |W| > tau else 0`` is the L1 criterion with a threshold. Scores are
computed on the layer's current effective weight, so repeated pruning builds on earlier masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from torchslim._utils import eval_mode
from torchslim.errors import DataError

CRITERIA = ("l1", "l2", "taylor")


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
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``|w * dL/dw|`` summed over a few batches (Molchanov et al. 2019).

    Args:
        model: the model (its train/eval mode and gradients are restored/cleared afterwards).
        layers: name -> module whose ``weight`` gets a score.
        data: a ``DataLoader`` or ``Dataset`` of ``(inputs, targets)``, or ``DataSplits`` (train split).
        loss_fn: ``loss_fn(model, inputs, targets)``; cross-entropy by default.
        max_batches: how many batches to accumulate.

    Returns:
        name -> score tensor shaped like the weight.

    Raises:
        DataError: if no data is given or it yields no batch.
    """
    if data is None:
        raise DataError("criterion 'taylor' needs data: pass data=... (labelled batches) to prune_")
    data = getattr(data, "train", data)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=64, shuffle=False)
    scores = {name: torch.zeros_like(module.weight, dtype=torch.float32) for name, module in layers.items()}
    seen = 0
    # eval mode: the importance of the deployed function (BatchNorm uses running statistics)
    with eval_mode(model):
        try:
            for inputs, targets in loader:
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, inputs, targets) if loss_fn else F.cross_entropy(model(inputs), targets)
                loss.backward()
                for name, module in layers.items():
                    grad = _weight_grad(module)
                    if grad is not None:
                        scores[name] += (effective_weight(module).detach() * grad).abs().float()
                seen += 1
                if seen >= max_batches:
                    break
        finally:
            model.zero_grad(set_to_none=True)
    if seen == 0:
        raise DataError("criterion 'taylor': the data yielded no batch; expected labelled (inputs, targets)")
    return scores


def _weight_grad(module: nn.Module) -> torch.Tensor | None:
    """Gradient of the effective weight (``weight_orig`` when a pruning mask is attached)."""
    orig = getattr(module, "weight_orig", None)
    if orig is not None:
        return None if orig.grad is None else orig.grad * module.weight_mask
    return module.weight.grad

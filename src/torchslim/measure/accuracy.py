"""Top-1 accuracy against labels, and fidelity (agreement, cosine) against a reference model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._utils import device_of, eval_mode, logits_of
from torchslim.errors import DataError
from torchslim.measure._common import iter_batches


def accuracy(model: nn.Module, dataset_or_loader: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode under ``torch.inference_mode``.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        dataset_or_loader: a ``Dataset`` of ``(x, y)``, a ``DataLoader`` of ``(x, y)`` batches, or
            ``DataSplits`` (its test split is used).
        batch_size: batch size for datasets (a loader keeps its own).

    Returns:
        The fraction of samples whose arg-max logit equals the label, in ``[0, 1]``.

    Raises:
        DataError: if the data is empty or has no labels.
    """
    device = device_of(model)
    correct = total = 0
    with eval_mode(model), torch.inference_mode():
        for inputs, targets in iter_batches(dataset_or_loader, batch_size):
            if targets is None:
                raise DataError("accuracy needs labelled data: expected (inputs, targets) samples or batches")
            predicted = logits_of(model(inputs.to(device)), "accuracy").argmax(dim=1)
            correct += int((predicted.cpu() == targets.reshape(-1).cpu()).sum())
            total += int(targets.numel())
    if total == 0:
        raise DataError("accuracy: the data has no samples (empty dataset or loader)")
    return correct / total


def fidelity(model: nn.Module, reference: nn.Module, inputs_or_dataset: Any, batch_size: int = 256) -> dict:
    """Compare ``model``'s logits with ``reference``'s on the same inputs (both in eval mode).

    Args:
        model: the (compressed) model.
        reference: the model it should imitate (e.g. the uncompressed original).
        inputs_or_dataset: a tensor of inputs, a ``Dataset``, a ``DataLoader`` or ``DataSplits``
            (labels, if any, are ignored).
        batch_size: batch size for tensors and datasets.

    Returns:
        ``{"agreement": float, "cosine": float}``: the fraction of samples with the same top-1
        class, and the mean over samples of the cosine similarity of the flattened logits.

    Raises:
        DataError: if the data is empty or the two models' outputs differ in shape.
    """
    device, ref_device = device_of(model), device_of(reference)
    agree = total = 0
    cosine_sum = 0.0
    with eval_mode(model, reference), torch.inference_mode():
        for inputs, _ in iter_batches(inputs_or_dataset, batch_size):
            out = logits_of(model(inputs.to(device)), "fidelity").float().cpu()
            ref = logits_of(reference(inputs.to(ref_device)), "fidelity").float().cpu()
            if out.shape != ref.shape:
                raise DataError(
                    f"fidelity: model output shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
                )
            agree += int((out.argmax(dim=1) == ref.argmax(dim=1)).sum())
            cos = F.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1)
            cosine_sum += float(cos.clamp(-1.0, 1.0).sum())
            total += out.shape[0]
    if total == 0:
        raise DataError("fidelity: the data has no samples (empty inputs, dataset or loader)")
    return {"agreement": agree / total, "cosine": cosine_sum / total}

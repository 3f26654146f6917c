"""Check that a model accepts a data set's inputs before any work is done."""

from __future__ import annotations

import torch
from torch import nn

from torchslim._utils import eval_mode, first_line
from torchslim.errors import DataError
from torchslim.models.registry import create_model, resolve_factory


def check_model_data(model: nn.Module, example_inputs: torch.Tensor, num_classes: int, data_name: str) -> None:
    """Run one sample through ``model`` and check the output covers every class.

    Args:
        model: the model to check (its train/eval mode is restored).
        example_inputs: a batch of at least one input sample.
        num_classes: number of classes in the data.
        data_name: the data spec, for the message.

    Raises:
        DataError: if the forward pass fails on this input shape, or the model has fewer outputs
            than the data has classes.
    """
    try:
        with eval_mode(model), torch.inference_mode():
            output = model(example_inputs[:1])
    except (RuntimeError, ValueError) as exc:
        raise DataError(
            f"data {data_name!r}: the model does not accept inputs of shape {tuple(example_inputs.shape[1:])} "
            f"({first_line(exc)}); expected the input shape the model was built for"
        ) from exc
    if output.ndim != 2 or output.shape[1] < num_classes:
        raise DataError(
            f"data {data_name!r} has {num_classes} classes but the model outputs shape {tuple(output.shape)}; "
            f"expected (batch, >= {num_classes})"
        )


def create_model_for_data(spec: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build a model sized for a data set: passes ``num_classes``, ``in_channels``, ``image_size``.

    Only the arguments the factory accepts are passed, so user factories with fewer parameters
    still work; explicit ``kwargs`` win.

    Args:
        spec: model name or ``package.module:callable``.
        input_shape: one sample's shape, ``(C, H, W)`` or ``(D,)``.
        num_classes: number of classes in the data.
        **kwargs: extra factory arguments.

    Returns:
        The model, with its factory (and these arguments) recorded for ``torchslim.save``.

    Raises:
        ModelError: unknown model or bad arguments.
    """
    import inspect

    factory, _ = resolve_factory(spec, trust=True)
    accepted = inspect.signature(factory).parameters
    derived: dict = {"num_classes": num_classes}
    if len(input_shape) == 3:
        derived["in_channels"] = input_shape[0]
        if input_shape[1] == input_shape[2]:
            derived["image_size"] = input_shape[1]
    elif len(input_shape) == 1:
        derived["in_channels"] = input_shape[0]
        derived["image_size"] = 1
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    chosen = {k: v for k, v in derived.items() if takes_any or k in accepted}
    chosen.update(kwargs)
    return create_model(spec, **chosen)

"""Shared pieces of structural pruning: Torch-Pruning import and tracing guards, model calls, importance, limits.

Internal to :mod:`torchslim.prune` (``channels`` and ``heads`` use them); not public API.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from torchslim._utils import device_of
from torchslim.errors import MissingDependencyError, ModelError
from torchslim.prune.importance import labelled_batches
from torchslim.train import default_loss

__all__ = [
    "LAYERS",
    "accumulate_gradients",
    "as_list",
    "bounded_groups",
    "call",
    "importance_of",
    "leaf_inputs",
    "max_removable",
    "output_shapes",
    "output_tensors",
    "require_torch_pruning",
    "tracing_state",
]


LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # TP root types (LSTM left out: no artifact codec)


# a pruning group with more dependencies than this many per module of the model is not converging (see bounded_groups)
_GROUP_DEPS_PER_MODULE = 50


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        raise MissingDependencyError(
            f"structural pruning needs Torch-Pruning: pip install torch-pruning ({exc})"
        ) from exc
    return torch_pruning


@contextlib.contextmanager
def bounded_groups(tp, model: nn.Module) -> Iterator[None]:
    """Turn a pruning group that never stops growing into a :class:`ModelError` instead of an endless loop.

    Torch-Pruning follows channel indices through every op; through rotary position embeddings (q/k channels sliced
    in halves and concatenated again: Llama, Phi, ...) each pass maps them to new indices, so building the group of a
    q/k projection never ends. Real groups hold a few dependencies per module, so a group past
    ``_GROUP_DEPS_PER_MODULE`` per module of the model is stopped. Torch-Pruning has no hook for this, so its
    ``Group.add_dep`` is wrapped while the block runs.
    """
    group_cls = tp.dependency.group.Group
    original = group_cls.add_dep
    limit = _GROUP_DEPS_PER_MODULE * max(sum(1 for _ in model.modules()), 20)

    def add_dep(self, dep, idxs):
        if len(self._group) >= limit:
            root = getattr(self._group[0].dep.target, "name", "?")
            raise ModelError(
                f"structural pruning: the dependency group of {root} does not converge (more than {limit} "
                "dependencies; channel indices are remapped on every pass, e.g. by rotary position embeddings that "
                "slice and concatenate q/k channels): these channels or heads cannot be pruned; prune FFN neurons "
                "only (ChannelPruning(heads=0)) or list the module in ChannelPruning.ignore"
            )
        return original(self, dep, idxs)

    group_cls.add_dep = add_dep
    try:
        yield
    finally:
        group_cls.add_dep = original


@contextlib.contextmanager
def tracing_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on every parameter while the block runs; each module's mode, every flag
    restored and gradients cleared afterwards.

    Tracing and importance use the deployed function (BatchNorm statistics are not touched), and the dependency graph
    is traced through autograd.
    """
    modes = {module: module.training for module in model.modules()}
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(True)
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for name, param in model.named_parameters():
            param.grad = None
            param.requires_grad_(grad_flags.get(name, True))


def call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def as_list(inputs: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    return [inputs] if isinstance(inputs, Tensor) else list(inputs)


def output_tensors(output: Any) -> Iterator[Tensor]:
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from output_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from output_tensors(item)


def output_shapes(model: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in output_tensors(call(model, inputs))]
    finally:
        for module, training in modes.items():
            module.training = training


def leaf_inputs(inputs: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """Copies of the inputs; float ones require grad so the graph shows which channels an input feeds."""

    def leaf(t: Tensor) -> Tensor:
        t = t.detach().clone()
        return t.requires_grad_(True) if t.is_floating_point() else t

    return leaf(inputs) if isinstance(inputs, Tensor) else tuple(leaf(t) for t in inputs)


def importance_of(tp, name: str):
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.BNScaleImportance()


def max_removable(channels: int, max_fraction: float, round_to: int) -> int:
    """How many of ``channels`` may go: at most ``max_fraction`` of them, at least one kept, kept count rounded up
    to a multiple of ``round_to`` (0 when the layer has fewer channels than ``round_to``).

    Args:
        channels: the layer's channel count.
        max_fraction: ``ChannelPruning.max_per_layer``.
        round_to: ``ChannelPruning.round_to``.

    Returns:
        The largest number of channels that may be removed.
    """
    removable = min(math.floor(channels * max_fraction + 1e-9), channels - 1)
    kept = channels - max(removable, 0)
    if round_to > 1:
        kept = math.ceil(kept / round_to) * round_to
    return max(channels - kept, 0)


def accumulate_gradients(model: nn.Module, data: Any, loss_fn: Callable | None) -> None:
    """Sum ``dL/dw`` over the first :data:`~torchslim.prune.importance.TAYLOR_BATCHES` batches of ``data``."""
    loss_fn = loss_fn or default_loss
    device = device_of(model)
    model.zero_grad(set_to_none=True)
    for inputs, targets in labelled_batches(data, "ChannelPruning(importance='taylor')"):
        loss_fn(model, inputs.to(device), targets.to(device)).backward()

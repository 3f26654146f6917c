"""Layer input Hessians ``H = 2 X^T X / n`` collected by forward hooks, one stage of layers at a time (for GPTQ).

A *stage* is the first layer still to quantize that a calibration pass reaches, together with every other layer
fed the very same input tensor (q/k/v projections, gate/up projections): GPTQ quantizes them together, and
:func:`collect_stage` stops each pass as soon as it reaches any other layer still to quantize. Linear layers of
a stage that read the same input share one accumulator (``X^T X`` is computed once for q, k and v).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim.errors import ModelError

__all__ = ["Hessian", "collect_all", "collect_stage", "layer_hessian"]


def _input_columns(module: nn.Module, x: Tensor) -> list[Tensor]:
    """The layer's inputs as ``(samples, cols)`` float32 matrices, one per conv group (one for Linear)."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return [x.reshape(-1, x.shape[-1])]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2) if x.dim() == 3 else x.unsqueeze(1)
        kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
        padding, dilation = (0, module.padding[0]), (1, module.dilation[0])
    else:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    per_group = x.shape[1] // module.groups
    out = []
    for g in range(module.groups):
        part = x[:, g * per_group : (g + 1) * per_group]
        cols = F.unfold(part, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
        out.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    return out


class Hessian:
    """Running ``2 X^T X / n`` of a layer's inputs (one matrix per conv group).

    Each batch's product is computed in float32 (as reference GPTQ does) and summed in float64.

    Args:
        module: the Linear/Conv layer whose inputs are added (decides how inputs become columns).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.sums: list[Tensor] | None = None
        self.count = 0
        self.last: tuple[int, tuple] | None = None  # (pass, input key) of the last input added
        # the last input itself: while it is alive no other tensor can get its address, so equal keys mean
        # the same data (a freed o_proj input was once taken for the gate/up input at the same address)
        self.held: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Add one input batch of the layer (any leading shape)."""
        columns = _input_columns(self.module, x)
        if self.sums is None:
            self.sums = [torch.zeros(c.shape[1], c.shape[1], dtype=torch.float64, device=c.device) for c in columns]
        for total, c in zip(self.sums, columns, strict=True):
            total += (c.T @ c).double()
        self.count += columns[0].shape[0]

    def matrices(self) -> list[Tensor]:
        """The Hessians, float32 on the CPU."""
        return [(2.0 * total / max(self.count, 1)).float().cpu() for total in self.sums or []]


def layer_hessian(module: nn.Module, inputs: Tensor) -> Tensor:
    """The GPTQ Hessian ``2 X^T X / n`` of a Linear/Conv layer for the given layer inputs.

    Args:
        module: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (``groups=1``).
        inputs: what the layer receives in ``forward`` (any batch shape).

    Returns:
        ``(cols, cols)`` float32, ``cols`` = the flattened weight's input dimension.
    """
    acc = Hessian(module)
    acc.add(inputs)
    return acc.matrices()[0]


class Stop(Exception):
    """Raised from a hook to end a calibration pass early."""


def _key(x: Tensor) -> tuple:
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


def _shares_columns(a: nn.Module, b: nn.Module) -> bool:
    # Linear layers turn the same input into the same columns; convolutions depend on their kernel
    return isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.in_features == b.in_features


class _Collector:
    """Forward pre-hook state: adds each watched layer's input to its accumulator, once per distinct tensor."""

    def __init__(self, staged: bool) -> None:
        self.staged = staged  # stop at a new layer reading another input than the stage's (else watch all)
        self.found: dict[nn.Module, Hessian] = {}
        self.key: tuple | None = None
        self.held: Tensor | None = None
        self.fixed = False  # after the first pass no layer joins
        self.index = 0  # the pass running now
        self.watched = 0  # layers watched
        self.calls: dict[nn.Module, int] = {}  # calls of each watched layer in the current pass
        self.first_calls: dict[nn.Module, int] = {}  # ... in the first pass

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        tag = (self.index, _key(x))
        acc = self.found.get(module)
        if acc is None:
            if self.fixed and not self.staged:
                return  # collect_all: a layer the first pass did not reach is left out in every pass
            if self.fixed or (self.staged and self.key is not None and self.key != tag[1]):
                raise Stop
            self.key, self.held = tag[1], x  # held for the same reason as Hessian.held
            acc = next((a for m, a in self.found.items() if a.last == tag and _shares_columns(m, module)), None)
            acc = self.found[module] = acc or Hessian(module)
        elif acc.last is not None and acc.last[0] == self.index and acc.last != tag and acc.module is not module:
            names = f"{type(acc.module).__name__} and {type(module).__name__}"
            raise ModelError(
                f"gptq: layers ({names}) that read one input in the first calibration batch read different inputs "
                f"in batch {self.index}: expected the same layers to share an input in every batch"
            )
        if acc.last != tag:
            acc.add(x)
            acc.last, acc.held = tag, x
        self.calls[module] = self.calls.get(module, 0) + 1
        if self.fixed:
            done = all(self.calls.get(m, 0) >= n for m, n in self.first_calls.items())
        else:  # the first pass: done once every watched layer is in (a layer run twice loses its second input)
            done = len(self.found) == self.watched
        if done:
            raise Stop  # every input this pass can add is in: the rest of the forward would be wasted work

    def run(self, runs: Sequence[Callable[[], Any]], modules: Iterable[nn.Module]) -> dict[nn.Module, Hessian]:
        modules = list(modules)
        self.watched = len(modules)
        handles = [module.register_forward_pre_hook(self.hook) for module in modules]
        try:
            for index, run in enumerate(runs):
                self.index, self.calls = index, {}
                try:
                    run()
                except Stop:
                    pass
                if not self.fixed:
                    self.first_calls = {m: n for m, n in self.calls.items() if m in self.found}
                self.fixed = True
                if not self.found:
                    break
        finally:
            for handle in handles:
                handle.remove()
        return self.found


def collect_stage(runs: Sequence[Callable[[], Any]], remaining: Iterable[nn.Module]) -> dict[nn.Module, Hessian]:
    """Run the calibration passes up to the first layer still to quantize and collect its stage's Hessians.

    Args:
        runs: one callable per calibration batch, each running one forward pass (of the model, or of one block
            on its cached inputs).
        remaining: the layers still to quantize (hooks go on these only).

    Returns:
        Layer -> its Hessian accumulator (shared by Linear layers reading the same input): the first remaining
        layer reached and every layer fed the same input tensor; ``{}`` when no remaining layer runs.

    Raises:
        ModelError: layers that read one tensor in the first pass read different tensors in a later one.
    """
    return _Collector(staged=True).run(runs, remaining)


def collect_all(runs: Sequence[Callable[[], Any]], modules: Iterable[nn.Module]) -> dict[nn.Module, Hessian]:
    """Collect the Hessians of all ``modules`` in one set of full passes (nothing is quantized in between).

    Args:
        runs: one callable per calibration batch.
        modules: the layers to watch.

    Returns:
        Layer -> its Hessian accumulator (shared as in :func:`collect_stage`), for the layers the first pass ran.

    Raises:
        ModelError: as :func:`collect_stage`.
    """
    return _Collector(staged=False).run(runs, modules)

"""Multi-teacher parameter fusion: the seed's formula for transferring K teachers' weights to one student.

The seed (``../shared/seed/``, "knowledge distillation", parameter transfer) gives, for K teacher parameter
sets ``W_k`` of the student's shapes, elementwise::

    W_s = sum_k W_k * exp(alpha * D(W_k, W_s)) / sum_k exp(alpha * D(W_k, W_s))

with ``D(a, b) = |a - b|`` or ``(a - b) ** 2``. ``W_s`` is on both sides, so it is solved by fixed-point
iteration from the teachers' mean. ``alpha = 0`` is plain averaging; ``alpha < 0`` gives a teacher less
weight where it is far from the current estimate, pulling each weight toward the majority (an outlier
teacher is down-weighted; with ``"squared"`` this is Gaussian mean shift); ``alpha > 0`` does the opposite.
Every iterate is a convex combination of the teachers, so ``W_s`` stays within ``[min_k W_k, max_k W_k]``.

``alpha`` is in units of 1/weight (``"abs"``) or 1/weight**2 (``"squared"``): weights of trained nets are
~0.01-0.1 apart, so ``alpha = -1`` is close to averaging and ``-100`` or lower is a strong pull.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, ModelError

__all__ = ["DISTANCES", "FusionResult", "ParameterFusion", "TensorFusion", "fuse_parameters"]

DISTANCES = ("abs", "squared")


@register_config("parameter_fusion")
@dataclasses.dataclass(frozen=True)
class ParameterFusion(Config):
    """Settings of :func:`fuse_parameters` (recorded in the recipe of a fused ``.slim`` file).

    Attributes:
        alpha: the seed's exponent factor (finite); 0 averages, < 0 pulls toward the majority.
        distance: ``"abs"`` (``|a - b|``) or ``"squared"`` (``(a - b) ** 2``).
        tol: stop when no weight of a tensor moved more than this in one iteration (> 0).
        max_iter: iteration cap per tensor (>= 1).
    """

    alpha: float = -1.0
    distance: str = "abs"
    tol: float = 1e-6
    max_iter: int = 100

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_float("alpha")
        self.check_choice("distance", DISTANCES)
        self.check_float("tol", 0, lo_inclusive=False)
        self.check_int("max_iter", 1)


@dataclasses.dataclass
class TensorFusion:
    """How one tensor was fused.

    Attributes:
        iterations: fixed-point iterations run (0 for tensors copied, not fused).
        residual: largest change of one weight in the last iteration (0.0 for copied tensors).
        converged: ``residual <= tol``.
        teacher_weights: each teacher's normalised weight in the final formula, averaged over the tensor's
            elements (sums to 1; equal shares for alpha = 0); empty for copied tensors.
        fused: False when the tensor was taken from the first teacher (integer buffers, ``filter_fn``).
    """

    iterations: int
    residual: float
    converged: bool
    teacher_weights: list[float]
    fused: bool = True


@dataclasses.dataclass
class FusionResult:
    """What :func:`fuse_parameters` produced.

    Attributes:
        state_dict: the fused tensors, same keys, shapes, dtypes and device as the first teacher's
            (load it with ``student.load_state_dict(result.state_dict)``).
        iterations: the most iterations any tensor needed.
        residual: the largest last-iteration change over all fused tensors.
        converged: every fused tensor reached ``tol`` within ``max_iter`` iterations.
        teacher_weights: each teacher's share of the fused model, averaged over all fused elements.
        tensors: per-tensor :class:`TensorFusion`.
        config: the :class:`ParameterFusion` used.
    """

    state_dict: dict[str, torch.Tensor]
    iterations: int
    residual: float
    converged: bool
    teacher_weights: list[float]
    tensors: dict[str, TensorFusion]
    config: ParameterFusion

    def summary(self) -> dict[str, Any]:
        """A JSON-safe summary (for manifests and ``--json``): iterations, residual, converged, weights."""
        return {
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "teacher_weights": list(self.teacher_weights),
            "fused_tensors": sum(1 for t in self.tensors.values() if t.fused),
            "copied_tensors": sum(1 for t in self.tensors.values() if not t.fused),
        }


def fuse_parameters(
    teachers: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    *,
    alpha: float = -1.0,
    distance: str = "abs",
    tol: float = 1e-6,
    max_iter: int = 100,
    filter_fn: Callable[[str], bool] | None = None,
) -> FusionResult:
    """Fuse K same-shaped teachers into one set of weights with the seed's formula (see the module doc).

    Each floating tensor is solved on its own, elementwise, in float64: start from the teachers' mean,
    then repeat ``W_s <- sum_k W_k w_k / sum_k w_k`` with ``w_k = exp(alpha * D(W_k, W_s))`` (the largest
    exponent per element is subtracted first, so no weight overflows) until no element moves more than
    ``tol`` or ``max_iter`` iterations ran. Integer tensors (BatchNorm's ``num_batches_tracked``) are not
    fused: ``num_batches_tracked`` takes the largest count; any other integer tensor must be equal in every
    teacher and is copied.

    Args:
        teachers: two or more models (their ``state_dict()``) or state dicts with the same keys and shapes.
            Float models only: packed/quantized layers and attached pruning masks are refused.
        alpha: the seed's exponent factor; 0 is plain averaging, < 0 pulls toward the majority.
        distance: ``"abs"`` or ``"squared"``.
        tol: convergence tolerance on the largest per-iteration change of a weight (> 0).
        max_iter: iteration cap per tensor (>= 1).
        filter_fn: ``filter_fn(name) -> bool``; tensors for which it returns False are copied from the
            first teacher. Default: fuse every floating tensor (BatchNorm running statistics included).

    Returns:
        A :class:`FusionResult` (fused state dict, iterations, residual, convergence, teacher shares).

    Raises:
        ConfigError: fewer than two teachers, or an invalid ``alpha``/``distance``/``tol``/``max_iter``.
        ModelError: teachers whose keys or shapes differ (the message names the tensor and shapes), a
            quantized/packed layer or attached pruning mask, or integer tensors that differ.
    """
    config = ParameterFusion(alpha=alpha, distance=distance, tol=tol, max_iter=max_iter)
    if isinstance(teachers, (nn.Module, Mapping)) or not isinstance(teachers, Sequence):
        raise ConfigError(
            f"teachers = {type(teachers).__name__} is invalid: expected a list of two or more models or state dicts"
        )
    if len(teachers) < 2:
        raise ConfigError(
            f"teachers has {len(teachers)} entr{'y' if len(teachers) == 1 else 'ies'}: expected at least 2 models "
            "or state dicts to fuse"
        )
    if filter_fn is not None and not callable(filter_fn):
        raise ConfigError(f"filter_fn = {filter_fn!r} is invalid: expected a callable filter_fn(name) -> bool")
    states = [_state_of(teacher, index) for index, teacher in enumerate(teachers)]
    _check_same_layout(states)

    fused: dict[str, torch.Tensor] = {}
    report: dict[str, TensorFusion] = {}
    shares = torch.zeros(len(states), dtype=torch.float64)
    elements = 0
    for name, first in states[0].items():
        values = [state[name] for state in states]
        if not first.is_floating_point():
            fused[name] = _integer_tensor(name, values)
            report[name] = TensorFusion(0, 0.0, True, [], fused=False)
            continue
        if filter_fn is not None and not filter_fn(name):
            fused[name] = first.detach().clone()
            report[name] = TensorFusion(0, 0.0, True, [], fused=False)
            continue
        tensor, stats, share = _fuse_tensor(values, config)
        fused[name] = tensor
        report[name] = stats
        shares += share * first.numel()
        elements += first.numel()
    fused_stats = [t for t in report.values() if t.fused]
    return FusionResult(
        state_dict=fused,
        iterations=max((t.iterations for t in fused_stats), default=0),
        residual=max((t.residual for t in fused_stats), default=0.0),
        converged=all(t.converged for t in fused_stats),
        teacher_weights=(shares / max(elements, 1)).tolist(),
        tensors=report,
        config=config,
    )


def _fuse_tensor(
    values: list[torch.Tensor], config: ParameterFusion
) -> tuple[torch.Tensor, TensorFusion, torch.Tensor]:
    """Solve one tensor: (fused tensor in the input dtype, its stats, mean share of each teacher)."""
    first = values[0]
    stack = torch.stack([v.detach().to(device=first.device, dtype=torch.float64).reshape(-1) for v in values])
    current = stack.mean(dim=0)
    weights = torch.full_like(stack, 1.0 / len(values))
    iterations, residual = 0, math.inf
    while iterations < config.max_iter:
        diff = stack - current
        distance = diff.abs() if config.distance == "abs" else diff * diff
        exponent = config.alpha * distance
        # softmax over teachers == exp(e_k) / sum exp(e_k), computed with the per-element max subtracted.
        weights = torch.softmax(exponent, dim=0)
        updated = (weights * stack).sum(dim=0)
        residual = float((updated - current).abs().max()) if updated.numel() else 0.0
        current = updated
        iterations += 1
        if residual <= config.tol:
            break
    share = weights.mean(dim=1) if weights.shape[1] else torch.full((len(values),), 1.0 / len(values))
    tensor = current.reshape(first.shape).to(dtype=first.dtype)
    stats = TensorFusion(iterations, residual, residual <= config.tol, share.cpu().tolist())
    return tensor, stats, share.cpu()


def _integer_tensor(name: str, values: list[torch.Tensor]) -> torch.Tensor:
    first = values[0]
    if name == "num_batches_tracked" or name.endswith(".num_batches_tracked"):
        return torch.stack([v.to(first.device) for v in values]).max(dim=0).values.to(first.dtype)
    for index, value in enumerate(values[1:], start=1):
        if not torch.equal(value.to(first.device), first):
            raise ModelError(
                f"tensor {name!r} ({first.dtype}) differs between teacher 0 and teacher {index}: only floating "
                "tensors are fused; integer tensors (packed or quantized codes?) must be equal. Fuse float "
                "models, then quantize the result"
            )
    return first.detach().clone()


def _state_of(teacher: nn.Module | Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The teacher's tensors, refusing packed/quantized layers and attached pruning masks."""
    if isinstance(teacher, nn.Module):
        for name, module in teacher.named_modules():
            kind = type(module).__name__
            where = f"teacher {index}: module {name or '<root>'!r} ({kind})"
            if hasattr(module, "slim_stats") or _is_torch_quantized(module):
                raise ModelError(
                    f"{where} is a quantized/packed layer: fusion works on float models; fuse the float "
                    "teachers, then quantize the fused model"
                )
            if any(_is_prune_hook(hook) for hook in module._forward_pre_hooks.values()):
                raise ModelError(
                    f"{where} has a pruning mask attached: call torchslim.finalize_(model) before fusing"
                )
        state = teacher.state_dict()
    elif isinstance(teacher, Mapping):
        state = dict(teacher)
    else:
        raise ConfigError(
            f"teachers[{index}] = {type(teacher).__name__} is invalid: expected an nn.Module or a state dict"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"teacher {index}: state entry {key!r} is a {type(value).__name__}, expected a tensor")
        if key.endswith("_orig") and f"{key[:-5]}_mask" in state:
            raise ModelError(
                f"teacher {index}: {key!r} has a pruning mask beside it: call torchslim.finalize_(model) before "
                "fusing"
            )
        if value.is_complex():
            raise ModelError(f"teacher {index}: tensor {key!r} is complex ({value.dtype}); expected real tensors")
    return state


def _check_same_layout(states: list[dict[str, torch.Tensor]]) -> None:
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        missing = [k for k in keys if k not in state]
        extra = [k for k in state if k not in states[0]]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(repr(k) for k in missing[:3])}")
            if extra:
                parts.append(f"extra {', '.join(repr(k) for k in extra[:3])}")
            raise ModelError(
                f"teacher {index} does not have teacher 0's tensors ({'; '.join(parts)}): expected teachers of "
                "the same architecture"
            )
        for key in keys:
            a, b = states[0][key], state[key]
            if a.shape != b.shape:
                raise ModelError(
                    f"tensor {key!r} has shape {tuple(b.shape)} in teacher {index} but {tuple(a.shape)} in teacher 0: "
                    "expected teachers with the student's shapes"
                )
            if a.is_floating_point() != b.is_floating_point():
                raise ModelError(
                    f"tensor {key!r} is {b.dtype} in teacher {index} but {a.dtype} in teacher 0: expected the same "
                    "kind of tensor in every teacher"
                )


def _is_prune_hook(hook: Any) -> bool:
    from torch.nn.utils.prune import BasePruningMethod

    return isinstance(hook, BasePruningMethod)


def _is_torch_quantized(module: nn.Module) -> bool:
    path = type(module).__module__
    return path.startswith("torch.") and "quantized" in path.split(".")

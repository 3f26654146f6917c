"""Feature (hint) distillation plumbing: capture activations by module name, learned projections.

FitNets (Romero et al. 2015) match an intermediate student activation to a teacher activation through a learned
regressor when their widths differ. Here a pair ``"teacher.module:student.module"`` names the two modules; their
outputs are captured with forward hooks. Conv maps whose spatial sizes differ are average-pooled to the smaller
size; a 1x1 conv (conv maps) or a linear layer (vectors and ``(N, L, D)`` hidden states) projects the student
width onto the teacher's. :class:`FeatureStudent` holds the student and the projections in one module, so the
training loop's optimizer (and checkpoints) see the projection parameters too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError, ModelError


def parse_pairs(features: Sequence[str]) -> list[tuple[str, str]]:
    """Split ``"teacher.name:student.name"`` strings into pairs.

    Args:
        features: the ``KD.features`` strings.

    Returns:
        ``[(teacher_name, student_name), ...]`` in order.

    Raises:
        ConfigError: an item without exactly one ``:`` or with an empty side.
    """
    pairs = []
    for item in features:
        teacher, sep, student = item.partition(":") if isinstance(item, str) else ("", "", "")
        if not sep or not teacher or not student or ":" in student:
            raise ConfigError(
                f"KD.features item {item!r} is invalid: expected 'teacher.module.name:student.module.name'"
            )
        pairs.append((teacher, student))
    return pairs


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule ``name`` of ``model``; a clear error listing some valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ModelError(f"{role} has no module named {name!r}: expected one of {shown}")
    return modules[name]


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # transformer layers return (hidden_states, ...)
    raise ModelError(f"feature module returned {type(output).__name__}: expected a tensor or a tuple starting with one")


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], role: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during forward passes inside the ``with`` block.

    Args:
        model: the model whose modules are hooked.
        names: module names (as in ``named_modules``).
        role: ``"teacher"`` or ``"student"``, for error messages.

    Yields:
        A dict name -> latest output tensor, refreshed by every forward pass.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = find_module(model, name, role)
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=name: store.__setitem__(key, _first_tensor(out))))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def align(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool conv maps of different spatial sizes to the smaller one (other shapes unchanged)."""
    if student.ndim == 4 and teacher.ndim == 4 and student.shape[2:] != teacher.shape[2:]:
        size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
        student = F.adaptive_avg_pool2d(student, size)
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def make_projection(student: torch.Tensor, teacher: torch.Tensor, kind: str, pair: str) -> nn.Module:
    """The learned map from a student activation to the teacher's shape (``nn.Identity`` when none is needed).

    Args:
        student: one aligned student activation (batch first).
        teacher: the aligned teacher activation.
        kind: the feature loss; ``"attention"`` compares maps summed over channels, so needs no projection.
        pair: the ``KD.features`` item, for the error message.

    Returns:
        ``nn.Identity``, a bias-free 1x1 ``nn.Conv2d`` (conv maps) or ``nn.Linear`` (last dimension).

    Raises:
        ModelError: activations whose shapes no projection can match.
    """
    s, t = tuple(student.shape[1:]), tuple(teacher.shape[1:])
    if kind == "attention":
        if student.ndim == teacher.ndim == 4 or (student.ndim == teacher.ndim == 3 and s[0] == t[0]):
            return nn.Identity()
        if student.ndim == teacher.ndim == 2 and s == t:
            return nn.Identity()
    elif s == t:
        return nn.Identity()
    elif student.ndim == teacher.ndim == 4:
        return nn.Conv2d(s[0], t[0], kernel_size=1, bias=False)
    elif student.ndim == teacher.ndim and s[:-1] == t[:-1]:
        return nn.Linear(s[-1], t[-1], bias=False)
    raise ModelError(
        f"KD.features {pair!r}: student activation {s} cannot be matched to teacher activation {t} with "
        f"feature_loss={kind!r}; expected conv maps (N, C, H, W), vectors (N, D) or hidden states (N, L, D) "
        "with the same sequence length"
    )


class FeatureStudent(nn.Module):
    """The student plus one projection per feature pair; ``forward`` is the student's.

    Attributes:
        student: the model being distilled.
        projections: ``nn.ModuleList``, one per pair, in the order of ``pairs``.
        pairs: ``[(teacher_name, student_name), ...]``.
    """

    def __init__(self, student: nn.Module, projections: Sequence[nn.Module], pairs: Sequence[tuple[str, str]]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(projections)
        self.pairs = list(pairs)

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)

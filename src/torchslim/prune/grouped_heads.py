"""Head removal inside one attention module, without a dependency graph: grouped-query and rotary attention.

Torch-Pruning's graph cannot follow the q/k channels of grouped-query attention (keys and values repeated for
several query heads) or of rotary position embeddings (head halves sliced and concatenated again), but an attention
module that holds its q/k/v projections *and* its output projection as ``nn.Linear`` children needs no graph: a
head's q/k/v rows feed only that head's scores and values, whose outputs enter only the output projection's
columns of that head. Grouped-query attention loses whole key/value groups (a key/value head and the query heads
that read it), so ``num_key_value_groups`` stays; multi-head attention is the case of one query head per group.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

__all__ = ["OUTPUT_NAMES", "GroupedAttention", "grouped_attention", "remove_groups_"]

# direct nn.Linear children of an attention module that project the concatenated heads back to the model width
OUTPUT_NAMES = ("o_proj", "out_proj", "o", "dense", "out_lin", "wo")


@dataclasses.dataclass
class GroupedAttention:
    """An attention module whose heads are removed here, a key/value group at a time.

    Attributes:
        module: the attention module.
        q, k, v, o: its query/key/value projections and its output projection.
        num_heads: query heads.
        kv_heads: key/value heads (``num_heads`` for multi-head attention).
        head_dim: channels per head.
    """

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.kv_heads


def grouped_attention(
    module: nn.Module, projections: tuple[nn.Linear, nn.Linear, nn.Linear], num_heads: int
) -> GroupedAttention | str:
    """Describe ``module`` for head removal here, or say why it cannot be.

    Args:
        module: the attention module (``num_heads`` query heads).
        projections: its q, k, v ``nn.Linear`` children.
        num_heads: its query head count.

    Returns:
        A :class:`GroupedAttention`, or the reason (a phrase) it is not one.
    """
    q, k, v = projections
    children = dict(module.named_children())
    outputs = [children[n] for n in OUTPUT_NAMES if isinstance(children.get(n), nn.Linear)]
    widths = [q.out_features, k.out_features, v.out_features]
    if num_heads < 1 or q.out_features % num_heads:
        return f"q width {q.out_features} is not a multiple of num_heads {num_heads}"
    head_dim = q.out_features // num_heads
    if k.out_features != v.out_features or k.out_features % head_dim:
        return f"q/k/v widths {widths} do not split into heads of {head_dim}"
    kv_heads = k.out_features // head_dim
    if num_heads % kv_heads:
        return f"{num_heads} query heads do not split into {kv_heads} key/value groups"
    if len(outputs) != 1 or outputs[0].in_features != q.out_features:
        return (
            f"q/k/v widths {widths}: no output projection child ({'/'.join(OUTPUT_NAMES)}) taking the "
            f"{q.out_features} head channels"
        )
    return GroupedAttention(module, q, k, v, outputs[0], num_heads, kv_heads, head_dim)


def _rows(att: GroupedAttention, groups: list[int]) -> tuple[Tensor, Tensor]:
    """Query rows (also the output projection's columns) and key/value rows of the given groups."""
    d, g = att.head_dim, att.group
    q_rows = [r for u in groups for r in range(u * g * d, (u + 1) * g * d)]
    kv_rows = [r for u in groups for r in range(u * d, (u + 1) * d)]
    return torch.tensor(q_rows, dtype=torch.long), torch.tensor(kv_rows, dtype=torch.long)


def group_scores(att: GroupedAttention, importance: str) -> Tensor:
    """One score per key/value group: ``l1``/``l2`` weight magnitude or ``taylor`` ``|w * dL/dw|`` (grads set)."""

    def weight_term(w: Tensor) -> Tensor:
        if importance == "taylor":
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            return (w.detach() * grad).abs()
        return w.detach().abs() if importance == "l1" else w.detach() ** 2

    scores = []
    for u in range(att.kv_heads):
        q_rows, kv_rows = _rows(att, [u])
        total = weight_term(att.q.weight)[q_rows].sum() + weight_term(att.o.weight)[:, q_rows].sum()
        total = total + weight_term(att.k.weight)[kv_rows].sum() + weight_term(att.v.weight)[kv_rows].sum()
        scores.append(float(total))
    return torch.tensor(scores, dtype=torch.float64)


def _keep_rows_(layer: nn.Linear, rows: Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[rows].clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[rows].clone(), requires_grad=layer.bias.requires_grad)
    layer.out_features = len(rows)


def _keep_columns_(layer: nn.Linear, columns: Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, columns].clone(), requires_grad=layer.weight.requires_grad)
    layer.in_features = len(columns)


def remove_groups_(att: GroupedAttention, count: int, importance: str) -> list[int]:
    """Remove the ``count`` least important key/value groups of ``att`` in place; set its head counts.

    The module's ``num_heads`` (and ``num_key_value_heads`` / ``num_attention_heads`` where it has such int
    attributes) are set to the new counts; ``head_dim`` and the model width stay.

    Args:
        att: the attention module, as :func:`grouped_attention` described it.
        count: groups to remove, in ``[1, kv_heads)``.
        importance: ``"l1"``, ``"l2"`` or ``"taylor"``.

    Returns:
        The kept groups (indices into the original key/value heads).

    Raises:
        ValueError: ``count`` would remove no group or every group.
    """
    if not 1 <= count < att.kv_heads:
        raise ValueError(f"count = {count} is invalid: expected 1 to {att.kv_heads - 1} key/value groups")
    order = torch.argsort(group_scores(att, importance), stable=True)
    kept = sorted(int(u) for u in order[count:])
    q_rows, kv_rows = _rows(att, kept)
    with torch.no_grad():
        _keep_rows_(att.q, q_rows)
        _keep_rows_(att.k, kv_rows)
        _keep_rows_(att.v, kv_rows)
        _keep_columns_(att.o, q_rows)
    heads, kv_heads = len(kept) * att.group, len(kept)
    module = att.module
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        current = getattr(module, attr, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(module, attr, value)
    att.num_heads, att.kv_heads = heads, kv_heads
    return kept

"""Attention heads: which modules can lose heads, how many, and their removal (``ChannelPruning.heads``).

Heads are removed whole from attention modules built the usual way: a ``num_heads`` attribute and separate
``nn.Linear`` query/key/value projections as direct children (named ``q``/``k``/``v``, ``q_proj``/``k_proj``/``v_proj``,
``query``/``key``/``value``, ``to_q``/``to_k``/``to_v``, ``wq``/``wk``/``wv`` or ``q_lin``/``k_lin``/``v_lin``) whose
outputs are split into heads. The q/k/v outputs and the output projection's inputs lose ``head_dim`` channels per
removed head; ``head_dim`` and the model width (the residual stream) stay, and the module's ``num_heads`` is set to
the new count (its forward must reshape with ``self.num_heads`` or ``-1``). Heads are ranked within each attention
module (also under ``global_ranking``) and at least one always stays. The q/k/v projections never lose single
channels to ``amount``: heads are their only unit.

Multi-head attention goes through Torch-Pruning's head pruning (``num_heads``, ``prune_num_heads=True``,
``prune_head_dims=False``) on the traced graph. Grouped-query attention (k/v narrower than q) loses whole key/value
groups without the graph (:mod:`torchslim.prune.grouped_heads`; the module must hold its output projection), and so
does multi-head attention holding its output projection where the traced groups do not converge (rotary position
embeddings).

``nn.MultiheadAttention`` is kept whole. Its packed ``in_proj_weight`` is ``(3 * E, E)`` and its output projection
``(E, E)``, with ``E`` the model width, so it cannot hold fewer heads of the same ``head_dim`` without shrinking the
residual stream; Torch-Pruning's MultiheadAttention pruner removes ``embed_dim`` channels (the residual width) and
keeps ``num_heads`` (``head_dim`` shrinks), and its head pruning needs Linear q/k/v layers (with an
``nn.MultiheadAttention`` in ``num_heads`` it removes nothing, or fails under global pruning). To prune heads of such a
model, build its attention from separate q/k/v/out ``nn.Linear`` layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.config import Config  # a ChannelPruning (channels.py imports this module)
from torchslim.errors import ConfigError, ModelError
from torchslim.prune.graph import (
    LAYERS,
    accumulate_gradients,
    as_list,
    call,
    importance_of,
    leaf_inputs,
    max_removable,
    output_shapes,
)
from torchslim.prune.grouped_heads import GroupedAttention, grouped_attention, remove_groups_
from torchslim.prune.report import StructuralReport

__all__ = ["MHA_REASON", "QKV_NAMES", "attention_modules", "head_counts", "head_pass", "qkv_projections"]


# direct nn.Linear children of an attention module that project to queries / keys / values (split into heads)
QKV_NAMES = (
    ("q", "q_proj", "query", "to_q", "wq", "q_lin"),
    ("k", "k_proj", "key", "to_k", "wk", "k_lin"),
    ("v", "v_proj", "value", "to_v", "wv", "v_lin"),
)


MHA_REASON = (
    "nn.MultiheadAttention is kept whole: its q/k/v width is the model width (in_proj_weight is (3*E, E)), so it "
    "cannot lose heads without shrinking the residual stream around it; for head pruning build attention from "
    "separate q/k/v/out nn.Linear layers with a num_heads attribute"
)


@dataclasses.dataclass
class _Attention:
    """An attention module whose heads can be removed: separate q/k/v ``nn.Linear`` projections split into heads.

    ``grouped`` is set where the module also holds its output projection (see :mod:`torchslim.prune.grouped_heads`):
    its heads can then be removed without the traced graph, which grouped-query attention always needs (a key/value
    group is the unit) and multi-head attention needs where the graph does not converge (rotary embeddings).
    ``use_graph`` says which way this run removes them.
    """

    module: nn.Module
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]
    num_heads: int
    head_dim: int
    grouped: GroupedAttention | None = None
    use_graph: bool = True

    @property
    def units(self) -> int:
        """What ``ChannelPruning.heads`` counts: heads, or key/value groups of grouped-query attention."""
        return self.grouped.kv_heads if self.grouped is not None and not self.use_graph else self.num_heads


def attention_modules(model: nn.Module) -> dict[str, _Attention]:
    """Module name -> :class:`_Attention` for every module with an int ``num_heads`` and q/k/v Linear children.

    Multi-head attention (q/k/v of one width, divisible by ``num_heads``) is taken; grouped-query attention (k/v
    narrower than q) only with its output projection as a child (``grouped_heads.grouped_attention``). A fused
    ``qkv`` projection is not recognised.
    """
    found = {}
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(module, nn.MultiheadAttention) or not isinstance(heads, int) or isinstance(heads, bool):
            continue
        children = dict(module.named_children())
        projections = []
        for choices in QKV_NAMES:
            hits = [children[c] for c in choices if isinstance(children.get(c), nn.Linear)]
            if len(hits) == 1:
                projections.append(hits[0])
        if heads < 1 or len(projections) != 3:
            continue
        q, k, v = projections
        grouped = grouped_attention(module, (q, k, v), heads)
        grouped = grouped if isinstance(grouped, GroupedAttention) else None
        widths = {proj.out_features for proj in projections}
        if len(widths) == 1 and q.out_features % heads == 0:
            found[name] = _Attention(module, (q, k, v), heads, q.out_features // heads, grouped)
        elif grouped is not None:
            found[name] = _Attention(module, (q, k, v), heads, grouped.head_dim, grouped, use_graph=False)
    return found


def head_counts(model: nn.Module, attention: dict[str, _Attention]) -> dict[str, dict[str, Any]]:
    """Attention module name -> ``{"type", "before", "after"}`` with its current head count in both."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or name in attention:
            rows[name] = {"type": type(module).__name__, "before": module.num_heads, "after": module.num_heads}
    return rows


def head_pass(
    tp,
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    attention: dict[str, _Attention],
    ignored: dict[nn.Module, str],
    names: dict[nn.Module, str],
    config: Config,
    report: StructuralReport,
    gradients: tuple[Any, Callable | None],
) -> bool:
    """Remove ``config.heads`` of the heads of every attention module that can lose some, in place.

    Args:
        tp: the ``torch_pruning`` module.
        model: the model (in :func:`~torchslim.prune.graph.tracing_state`).
        inputs: example inputs.
        attention: :func:`attention_modules` of the model.
        ignored: module -> why its output channels stay.
        names: module -> name.
        config: the ``ChannelPruning`` config.
        report: filled with kept modules (``skipped``) and ``details["head_groups_pruned"]``.
        gradients: ``(data, loss_fn)`` for Taylor importance.

    Returns:
        Whether Taylor gradients were accumulated (the channel pass reuses them).

    Raises:
        ConfigError: no attention module can lose a head.
        ModelError: the graph cannot be traced, removes no head, or the forward fails afterwards.
    """
    pruner, plan = _plan_heads(tp, model, inputs, attention, ignored, names, config, report)
    taylor = config.importance == "taylor"
    if taylor:
        accumulate_gradients(model, *gradients)
    report.details["head_groups_pruned"] = _prune_heads(pruner, plan, model, inputs, config.importance, report)
    return taylor


def _plan_heads(
    tp,
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    attention: dict[str, _Attention],
    ignored: dict[nn.Module, str],
    names: dict[nn.Module, str],
    config: Config,
    report: StructuralReport,
):
    """Decide how many heads (key/value groups) each attention module loses; trace the graph for those that need it.

    Returns:
        ``(pruner, plan)``: a Torch-Pruning ``BasePruner`` that only removes whole heads of the planned modules whose
        heads go through the graph (None when none does), and attention module name -> (:class:`_Attention`, units
        to remove: heads, or key/value groups where ``use_graph`` is false).

    Raises:
        ConfigError: no attention module can lose a head (the reasons are listed).
        ModelError: the graph cannot be traced.
    """
    plan: dict[str, tuple[_Attention, int]] = {}
    for name, att in attention.items():
        reason = _heads_kept_reason(att, ignored, names, config)
        if reason is not None:
            report.skipped.setdefault(name, reason)
        else:
            plan[name] = (att, _removable_units(att, config))
    pruner = _graph_head_pruner(tp, model, inputs, plan, names, config, report) if plan else None
    if not plan:
        found = {n: r for n, r in report.skipped.items() if n in report.heads}
        raise ConfigError(
            f"ChannelPruning(heads={config.heads}): no attention module can lose a head: "
            + (
                "; ".join(f"{n}: {r}" for n, r in found.items())
                if found
                else _unsupported_attention(model)
                or "the model has no attention module with a num_heads attribute and separate q/k/v nn.Linear "
                "projections"
            )
        )
    return pruner, plan


def _removable_units(att: _Attention, config: Config) -> int:
    units = att.units
    return min(math.ceil(config.heads * units - 1e-9), max_removable(units, config.max_per_layer, 1))


def _heads_kept_reason(
    att: _Attention, ignored: dict[nn.Module, str], names: dict[nn.Module, str], config: Config
) -> str | None:
    """Why ``att`` keeps all its heads before any tracing, or None."""
    blocking = next((m for m in (att.module, *att.projections) if m in ignored), None)
    if blocking is not None:
        return f"heads kept: {names[blocking]!r} is kept ({ignored[blocking]})"
    if not att.use_graph and config.importance == "bn":
        return "heads kept: importance 'bn' needs a BatchNorm on its q/k/v outputs; there is none"
    if _removable_units(att, config) >= 1:
        return None
    if att.units == 1 and att.num_heads > 1:
        return (
            f"heads kept: grouped-query attention with one key/value head for its {att.num_heads} query heads: "
            "heads go a whole key/value group at a time and the last group stays"
        )
    unit = "head(s)" if att.use_graph else "key/value group(s)"
    return (
        f"heads kept: heads {config.heads} and max_per_layer {config.max_per_layer} remove none of its "
        f"{att.units} {unit} (at least one stays)"
    )


def _graph_head_pruner(tp, model, inputs, plan, names, config, report):
    """The Torch-Pruning pruner of the planned modules with ``use_graph``, or None when there are none.

    Where the traced groups do not converge (rotary position embeddings), modules that hold their output projection
    switch to removal without the graph (``use_graph = False``) and the rest is traced again.

    Raises:
        ModelError: the graph cannot be traced (and no module can do without it).
    """
    graph_plan = {name: entry for name, entry in plan.items() if entry[0].use_graph}
    if not graph_plan:
        return None
    leaves = leaf_inputs(inputs)
    heads = {proj: att.num_heads for att, _ in graph_plan.values() for proj in att.projections}
    try:
        pruner = tp.pruner.BasePruner(
            model,
            leaves,
            importance=importance_of(tp, config.importance),
            global_pruning=False,  # heads are ranked within each attention module
            # any ratio > 0 opens the attention groups; prune_head_dims=False removes whole heads only, and every
            # other layer is ignored in this pass
            pruning_ratio=0.5,
            ignored_layers=[m for m in model.modules() if isinstance(m, LAYERS) and m not in heads],
            root_module_types=list(LAYERS),
            forward_fn=call,
            unwrapped_parameters=[(t, 1 if t.dim() > 1 else 0) for t in as_list(leaves) if t.requires_grad],
            num_heads=heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=config.heads,
            # Torch-Pruning removes ceil(ratio * num_heads) heads: this ratio gives exactly ``removable``
            head_pruning_ratio_dict={att.module: (n - 0.5) / att.num_heads for att, n in graph_plan.values()},
        )
        _check_head_groups(pruner, graph_plan, names, leaves, config, report)
    except Exception as exc:  # tracing runs user code; Torch-Pruning raises assorted types
        movable = [att for att, _ in graph_plan.values() if att.grouped is not None]
        if "does not converge" in str(exc) and movable:
            for att in movable:
                att.use_graph = False
            return _graph_head_pruner(tp, model, inputs, plan, names, config, report)
        if isinstance(exc, ModelError) and "does not converge" not in str(exc):
            raise
        raise ModelError(f"prune_channels_: cannot trace the model's dependency graph: {exc}") from exc
    for name in [n for n, (att, _) in plan.items() if att.use_graph and n not in graph_plan]:
        del plan[name]
    return pruner if graph_plan else None


def qkv_projections(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear, nn.Linear]]:
    """Module name -> its q/k/v ``nn.Linear`` children, for every module that has all three (heads or not)."""
    found = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        projections = [next((children[c] for c in choices if isinstance(children.get(c), nn.Linear)), None)
                       for choices in QKV_NAMES]
        if all(p is not None for p in projections):
            found[name] = tuple(projections)
    return found


def _unsupported_attention(model: nn.Module) -> str:
    """Why modules with q/k/v ``nn.Linear`` children were not taken (grouped-query attention ...), or ``""``."""
    reasons = []
    for name, projections in qkv_projections(model).items():
        module = model.get_submodule(name)
        widths = [p.out_features for p in projections]
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or isinstance(heads, bool):
            reasons.append(f"{name}: no int num_heads attribute")
        elif len(set(widths)) > 1:
            why = grouped_attention(module, projections, heads)
            if isinstance(why, str):
                reasons.append(f"{name}: grouped-query attention is not supported here: {why}")
    if len(reasons) > 2:
        reasons = [*reasons[:2], f"and {len(reasons) - 2} more"]
    return "; ".join(reasons)


def _check_head_groups(
    pruner,
    plan: dict[str, tuple[_Attention, int]],
    names: dict[nn.Module, str],
    leaves: Tensor | tuple[Tensor, ...],
    config: Config,
    report: StructuralReport,
) -> None:
    """Drop from ``plan`` (and ignore) the attention modules whose q/k/v outputs do not form one clean group.

    A head can only go if the traced graph ties the q, k and v outputs together (as attention does) and to no other
    layer's outputs or to a model input.
    """
    graph = pruner.DG
    inputs = as_list(leaves)
    owners_of = {}
    for group in graph.get_all_groups(ignored_layers=[], root_module_types=pruner.root_module_types):
        owners = {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}
        tied_to_input = any(any(dep.target.module is t for t in inputs) for dep, _ in group)
        for att, _ in plan.values():
            if att.projections[0] in owners:
                owners_of[att.module] = (owners, tied_to_input, group)
    for name in list(plan):
        att, _ = plan[name]
        owners, tied_to_input, group = owners_of.get(att.module, (set(), False, None))
        layers = {m for m in owners if m in names and isinstance(m, LAYERS)}
        reason = None
        if layers != set(att.projections):
            others = sorted(names[m] for m in layers - set(att.projections))
            reason = "heads kept: the traced graph does not tie its q/k/v outputs together" + (
                f" (they are tied to {', '.join(others)})" if others else ""
            )
        elif tied_to_input:
            reason = "heads kept: its q/k/v outputs are tied to a model input"
        elif config.importance == "bn" and not any(
            isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group
        ):
            reason = "heads kept: importance 'bn' needs a BatchNorm on its q/k/v outputs; there is none"
        if reason is not None:
            report.skipped.setdefault(name, reason)
            pruner.ignored_layers.extend(att.projections)
            del plan[name]


def _prune_heads(
    pruner,
    plan: dict[str, tuple[_Attention, int]],
    model: nn.Module,
    inputs: Any,
    importance: str,
    report: StructuralReport,
) -> int:
    """Run the head pass; set each module's ``num_heads``; returns the number of groups pruned.

    Modules whose heads the graph left whole are dropped from ``plan`` (the reason is in ``report.skipped``).

    Raises:
        ModelError: the graph removed no head at all, the projections disagree with the new head count, or the
            forward fails afterwards.
    """
    pruned = 0
    with torch.no_grad():
        for group in pruner.step(interactive=True) if pruner is not None else ():
            if pruner.DG.check_pruning_group(group):
                group.prune()
                pruned += 1
    untouched = [
        name
        for name, (att, _) in plan.items()
        if att.use_graph and att.projections[0].out_features == att.num_heads * att.head_dim
    ]
    if untouched and len(untouched) == len(plan):
        raise ModelError(
            f"prune_channels_: Torch-Pruning removed no head of attention {', '.join(map(repr, untouched))}: its "
            "traced head groups did not pass its checks (e.g. a per-head tensor such as Swin's relative position "
            "bias table is added to the attention scores); prune FFN neurons only (ChannelPruning(heads=0)) or list "
            "these modules in ChannelPruning.ignore"
        )
    for name in untouched:
        report.skipped.setdefault(name, "heads kept: Torch-Pruning's traced head groups removed none of its heads")
        del plan[name]
    for name, (att, count) in plan.items():
        if att.use_graph:
            heads, kv_heads = pruner.num_heads[att.projections[0]], pruner.num_heads[att.projections[0]]
        else:
            remove_groups_(att.grouped, count, importance)
            heads, kv_heads = att.grouped.num_heads, att.grouped.kv_heads
            pruned += 1
        widths = [proj.out_features for proj in att.projections]
        if widths != [heads * att.head_dim] + [kv_heads * att.head_dim] * 2:  # pragma: no cover - a bug lands here
            raise ModelError(
                f"prune_channels_: attention {name!r} has q/k/v widths {widths} after head pruning, expected "
                f"{heads} query and {kv_heads} key/value heads of {att.head_dim}"
            )
        att.module.num_heads = heads
    try:
        output_shapes(model, inputs)
    except Exception as exc:
        raise ModelError(
            f"prune_channels_: the model's forward fails after removing attention heads ({exc}): attention "
            f"modules ({', '.join(plan)}) must reshape q/k/v with self.num_heads (or -1) and a fixed head_dim"
        ) from exc
    return pruned

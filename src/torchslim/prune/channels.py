"""Structural pruning of channels: :class:`ChannelPruning` and :func:`prune_channels_` (heads first, then channels).

``prune_channels_`` removes whole output channels of ``Conv``/``Linear`` layers and everything that depends on
them (BatchNorm/LayerNorm features, the next layers' inputs, every layer tied by a residual add, the
``flatten -> linear`` expansion). The dependency graph and the surgery are Torch-Pruning's
(``tp.pruner.BasePruner``); this module decides what may be pruned and how much, and reports it:

- the output layer (the layer whose output is the model's output, i.e. the classifier) is never pruned, nor the
  layers named in ``ChannelPruning.ignore`` or refused by ``filter_fn``;
- channels tied to a model input (e.g. ``x + ffn(x)`` on the raw input) are kept, because the input cannot shrink;
- channels running through a tied weight that several dependency groups reach are kept (they could not stay one
  tensor);
- no layer loses more than ``max_per_layer`` of its channels, and kept counts are multiples of ``round_to``.

Attention heads (``ChannelPruning.heads``) are removed first (:mod:`torchslim.prune.heads`). FFN neurons of any
transformer block are pruned normally by ``amount``. The result is a plain, smaller dense ``nn.Module`` (no masks);
``torchslim.save`` records the new layer shapes in the manifest and ``torchslim.load`` rebuilds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.measure import count_macs, parameter_stats
from torchslim.prune.api import pruning_handler
from torchslim.prune.graph import (
    LAYERS,
    accumulate_gradients,
    as_list,
    bounded_groups,
    call,
    importance_of,
    leaf_inputs,
    max_removable,
    output_shapes,
    output_tensors,
    require_torch_pruning,
    tracing_state,
)
from torchslim.prune.heads import MHA_REASON, attention_modules, head_counts, head_pass, qkv_projections
from torchslim.prune.report import StructuralReport, finish_report, layer_shapes

__all__ = ["IMPORTANCES", "ChannelPruning", "prune_channels_"]


IMPORTANCES = ("l1", "l2", "taylor", "bn")


@register_config("channel")
@dataclasses.dataclass(frozen=True)
class ChannelPruning(Config):
    """Structural pruning: remove whole channels / neurons and shrink the model physically.

    Args:
        amount: fraction of output channels (conv filters, Linear neurons) removed from each prunable layer, or
            over all prunable layers together when ``global_ranking``; in ``[0, 1)``. ``0.5`` halves every
            prunable width, which removes about 75% of the MACs and parameters of layers whose inputs and
            outputs both shrink.
        importance: how channels are ranked: ``"l1"``/``"l2"`` weight magnitude, ``"taylor"`` (first-order
            ``|w * dL/dw|``, needs ``data``) or ``"bn"`` (BatchNorm ``|gamma|``; groups without BatchNorm are kept).
        round_to: kept channel counts are multiples of this (>= 1), e.g. 8 for fast kernels.
        global_ranking: rank all channels of the model against each other instead of layer by layer.
        ignore: module names never pruned (a container name covers its submodules). The output layer is always
            kept whole without being listed.
        max_per_layer: never remove more than this fraction of one layer's channels, in ``(0, 1]`` (at least one
            channel always stays); also caps the fraction of heads one attention module loses.
        heads: fraction of the attention heads removed from each attention module with separate q/k/v ``nn.Linear``
            projections (see the module docstring), in ``[0, 1)``; the count removed is rounded up and at least one
            head stays. ``0`` leaves attention modules untouched. ``nn.MultiheadAttention`` is always kept whole.
    """

    stage = "prune"
    structural = True

    amount: float = 0.5
    importance: str = "l1"
    round_to: int = 1
    global_ranking: bool = False
    ignore: tuple[str, ...] = ()
    max_per_layer: float = 0.9
    heads: float = 0.0

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_float("amount", 0.0, 1.0, hi_inclusive=False)
        self.check_choice("importance", IMPORTANCES)
        self.check_int("round_to", 1)
        if not isinstance(self.global_ranking, bool):
            raise self.fail("global_ranking", self.global_ranking, "True or False")
        if not isinstance(self.ignore, tuple) or not all(isinstance(n, str) and n for n in self.ignore):
            raise self.fail("ignore", self.ignore, "a tuple of module names, e.g. ('fc1',)")
        self.check_float("max_per_layer", 0.0, 1.0, lo_inclusive=False)
        self.check_float("heads", 0.0, 1.0, hi_inclusive=False)


def prune_channels_(
    model: nn.Module,
    config: ChannelPruning,
    example_inputs: Tensor | tuple[Tensor, ...] | list[Tensor] | None = None,
    *,
    data: Any = None,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> StructuralReport:
    """Remove channels (and attention heads) from ``model`` in place; every dependent layer shrinks with them.

    The model keeps its train/eval mode (every submodule's own flag) and ``requires_grad`` flags; its outputs
    keep their shapes. The pruned model is a plain dense module that ``torchslim.save`` stores with its new
    shapes. Fine-tune afterwards (``torchslim.train``) to recover accuracy.

    Heads go first (when ``config.heads > 0``), then channels, each pass on a freshly traced dependency graph.

    Args:
        model: a float model built from Conv/Linear/BatchNorm/LayerNorm layers (any control flow that traces),
            possibly with attention modules (see the module docstring for which ones can lose heads).
        config: a :class:`ChannelPruning`.
        example_inputs: a batch of inputs (tensor, or tuple of tensors passed positionally) used to trace the
            dependency graph and count MACs.
        data: labelled batches for ``importance="taylor"``: a ``DataLoader``, a ``Dataset`` of ``(x, y)`` or a
            ``DataSplits`` (its train split); the first few batches are used.
        loss_fn: ``loss_fn(model, inputs, targets) -> loss`` for ``taylor`` (cross-entropy by default).
        filter_fn: ``filter_fn(module, name) -> bool``; Conv/Linear layers for which it is false are kept.

    Returns:
        A :class:`StructuralReport` (per-layer shapes, head counts, parameters and MACs before/after, kept layers
        and why).

    Raises:
        ConfigError: ``config`` is not a ``ChannelPruning``; an ``ignore`` name is not a module of the model;
            nothing in the model can be pruned (everything ignored or tied to something kept, or ``"bn"``
            importance without BatchNorm); ``heads > 0`` but no attention module can lose a head.
        DataError: ``example_inputs`` missing or not tensors; ``taylor`` without usable ``data``.
        ModelError: the model holds pruning masks (call ``finalize_`` first) or compressed (quantized) layers, the
            graph cannot be traced, or an attention module's forward fails once its heads are removed.
        MissingDependencyError: ``torch-pruning`` is not installed.
    """
    tp = require_torch_pruning()
    inputs = _checked_arguments(model, config, example_inputs, data)

    names = {module: name for name, module in model.named_modules()}
    report = StructuralReport(details={"config": config.to_dict(), "notes": []})
    report.params_before = parameter_stats(model)["parameters"]
    report.macs_before = count_macs(model, inputs)
    before = layer_shapes(model)
    attention = attention_modules(model)
    report.heads = head_counts(model, attention)
    tied = _tied_parameters(model)
    with bounded_groups(tp, model), tracing_state(model):
        out_shapes = output_shapes(model, inputs)
        ignored = _ignored_layers(model, config, filter_fn, _output_layers(model, inputs), report)
        taylor_done = config.heads > 0 and head_pass(
            tp, model, inputs, attention, ignored, names, config, report, (data, loss_fn)
        )
        candidates = _channel_pass(
            tp, model, inputs, ignored, names, config, report, tied, None if taylor_done else (data, loss_fn)
        )
    _retie_(model, tied)
    new_shapes = output_shapes(model, inputs)
    if new_shapes != out_shapes:  # pragma: no cover - a Torch-Pruning bug would land here
        raise ModelError(f"prune_channels_: the model's output shapes changed from {out_shapes} to {new_shapes}")
    finish_report(report, before, layer_shapes(model), head_counts(model, attention), candidates, config)
    report.params_after = parameter_stats(model)["parameters"]
    report.macs_after = count_macs(model, inputs)
    return report


def _checked_arguments(model: Any, config: Any, example_inputs: Any, data: Any) -> Tensor | tuple[Tensor, ...]:
    """Check what :func:`prune_channels_` was given; returns the example inputs on the model's device."""
    if not isinstance(config, ChannelPruning):
        raise ConfigError(f"config = {type(config).__name__} is invalid for prune_channels_: expected ChannelPruning")
    if not isinstance(model, nn.Module):
        raise ModelError(f"prune_channels_: model is a {type(model).__name__}, expected a torch.nn.Module")
    _check_model(model)
    inputs = _check_inputs(example_inputs, model)
    if config.importance == "taylor" and data is None:
        raise DataError(
            "ChannelPruning(importance='taylor') needs data: pass data=... (a DataLoader, Dataset or DataSplits of "
            "labelled batches) so gradients can be computed, or use importance='l1'"
        )
    return inputs


def _channel_pass(
    tp,
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    ignored: dict[nn.Module, str],
    names: dict[nn.Module, str],
    config: ChannelPruning,
    report: StructuralReport,
    tied: list,
    gradients: tuple[Any, Callable | None] | None,
) -> list[str]:
    """Remove ``config.amount`` of the channels on a freshly traced graph; returns the prunable layer names.

    ``gradients`` is ``(data, loss_fn)`` when Taylor gradients still have to be accumulated, else None.

    Raises:
        ConfigError: nothing can be pruned (and no head was).
        ModelError: the graph cannot be traced.
    """
    # heads are the only unit of q/k/v (also of attention whose heads cannot be pruned); ``amount`` never splits them
    for name, projections in qkv_projections(model).items():
        for proj in projections:
            if proj not in ignored:
                ignored[proj] = f"projection of attention {name!r}: loses whole heads only (ChannelPruning.heads)"
                report.skipped.setdefault(names[proj], ignored[proj])
    leaves = leaf_inputs(inputs)
    try:
        pruner = tp.pruner.BasePruner(
            model,
            leaves,
            importance=importance_of(tp, config.importance),
            global_pruning=config.global_ranking,
            pruning_ratio=config.amount,
            max_pruning_ratio=config.max_per_layer,
            ignored_layers=list(ignored),
            round_to=config.round_to if config.round_to > 1 else None,
            root_module_types=list(LAYERS),
            forward_fn=call,
            unwrapped_parameters=[(t, 1 if t.dim() > 1 else 0) for t in as_list(leaves) if t.requires_grad],
        )
    except Exception as exc:  # tracing runs user code; Torch-Pruning raises assorted types
        raise ModelError(f"prune_channels_: cannot trace the model's dependency graph: {exc}") from exc
    candidates = _plan_groups(pruner, names, ignored, leaves, config, report, tied)
    if config.amount > 0 and not candidates and not report.details.get("head_groups_pruned"):
        raise ConfigError(
            f"ChannelPruning(amount={config.amount}, importance={config.importance!r}): nothing in the model "
            "can be pruned: " + "; ".join(f"{n}: {r}" for n, r in report.skipped.items())
        )
    if config.importance == "taylor" and gradients is not None:
        accumulate_gradients(model, *gradients)
    pruned_groups = 0
    for group in pruner.step(interactive=True):
        group = _capped(pruner, group, config)
        if group is not None and pruner.DG.check_pruning_group(group):
            group.prune()
            pruned_groups += 1
    report.details["groups_pruned"] = pruned_groups
    return candidates


def _tied_parameters(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[nn.Module, str, str]]]]:
    """``(parameter, [(module, attribute, name), ...])`` for each Parameter held by two or more modules (tied)."""
    owners: dict[int, tuple[nn.Parameter, dict[tuple[int, str], tuple[nn.Module, str, str]]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            owners.setdefault(id(param), (param, {}))[1].setdefault((id(module), attr), (module, attr, name))
    return [(param, list(group.values())) for param, group in owners.values() if len(group) > 1]


def _retie_(model: nn.Module, tied: list[tuple[nn.Parameter, list[tuple[nn.Module, str, str]]]]) -> None:
    """Share one Parameter again where Torch-Pruning replaced a tied weight by one copy per module.

    Its surgery gives every pruned module a new Parameter, so tied weights (an embedding and the output layer, T5's
    shared embedding) become copies: pruned alike (one group), so equal, but no longer one tensor. Holders the
    traced graph never reached (T5's ``shared``) keep the original: they get the pruned tensor too.

    Raises:
        ModelError: the pruned copies differ (pruned in different ways, e.g. T5's embedding shared by its encoder's
            and decoder's residual streams, which are separate groups); the message names them. The model is left
            pruned, with the copies untied.
    """
    for original, group in tied:
        params = [getattr(module, attr) for module, attr, _ in group]
        changed = [p for p in params if p is not original]
        if not changed:
            continue
        if any(p.shape != changed[0].shape or not torch.equal(p, changed[0]) for p in changed):
            names = ", ".join(f"{name} {tuple(p.shape)}" for (_, _, name), p in zip(group, params, strict=True))
            raise ModelError(
                f"structural pruning changed the tied weights {names} differently, so they cannot stay one tensor: "
                "list one of their modules in ChannelPruning.ignore"
            )
        for module, attr, _ in group:
            setattr(module, attr, changed[0])


def _check_model(model: nn.Module) -> None:
    from torch.nn.utils import prune as torch_prune

    for name, module in model.named_modules():
        if any(isinstance(h, torch_prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
            raise ModelError(
                f"prune_channels_: module {name!r} holds pruning masks; make them permanent first "
                "(torchslim.finalize_(model) or torch.nn.utils.prune.remove)"
            )
        if callable(getattr(module, "slim_stats", None)):
            raise ModelError(
                f"prune_channels_: module {name!r} ({type(module).__name__}) holds compressed weights: "
                "prune channels before quantizing"
            )


def _check_inputs(example_inputs: Any, model: nn.Module) -> Tensor | tuple[Tensor, ...]:
    if example_inputs is None:
        raise DataError(
            "ChannelPruning needs example_inputs: pass a batch of inputs (e.g. data.example_inputs()) so the "
            "dependency graph can be traced"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(example_inputs, Tensor):
        return example_inputs.detach().to(device)
    if (
        isinstance(example_inputs, (tuple, list))
        and example_inputs
        and all(isinstance(t, Tensor) for t in example_inputs)
    ):
        return tuple(t.detach().to(device) for t in example_inputs)
    raise DataError(f"example_inputs is a {type(example_inputs).__name__}: expected a tensor or a tuple of tensors")


def _output_layers(model: nn.Module, inputs: Any) -> list[nn.Module]:
    """Conv/Linear layers whose output (or a view of it) is a model output; else the last Linear run."""
    calls: list[tuple[nn.Module, Any]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
        for m in model.modules()
        if isinstance(m, LAYERS)
    ]
    try:
        with torch.no_grad():
            outputs = list(output_tensors(call(model, inputs)))
    finally:
        for hook in hooks:
            hook.remove()
    pointers = {t.untyped_storage().data_ptr() for t in outputs if t.numel()}
    found = []
    for module, out in calls:
        if isinstance(out, Tensor) and out.numel() and out.untyped_storage().data_ptr() in pointers:
            if module not in found:
                found.append(module)
    if not found:
        linears = [module for module, _ in calls if isinstance(module, nn.Linear)]
        if linears:
            found.append(linears[-1])
    return found


def _ignored_layers(
    model: nn.Module,
    config: ChannelPruning,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    output_layers: list[nn.Module],
    report: StructuralReport,
) -> dict[nn.Module, str]:
    """Module -> reason for every module whose output channels must stay (submodules included)."""
    modules = dict(model.named_modules())
    ignored: dict[nn.Module, str] = {}

    def keep(module: nn.Module, name: str, reason: str) -> None:
        report.skipped.setdefault(name, reason)
        for sub in module.modules():
            ignored.setdefault(sub, reason)

    for module in output_layers:
        name = next(n for n, m in modules.items() if m is module)
        keep(module, name, f"output layer: its {_width(module)} outputs are the model's outputs")
    for name in config.ignore:
        if name not in modules:
            close = [n for n in modules if n and (name in n or n in name)][:5]
            raise ConfigError(
                f"ChannelPruning.ignore contains {name!r}, which is not a module of the "
                f"{type(model).__name__}: expected module names such as "
                f"{', '.join(repr(n) for n in (close or [n for n in modules if n][:5]))}"
            )
        keep(modules[name], name, "listed in ChannelPruning.ignore")
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            keep(module, name, MHA_REASON)
        elif isinstance(module, LAYERS) and filter_fn is not None and module not in ignored:
            if not filter_fn(module, name):
                keep(module, name, "filter_fn returned False")
    return ignored


def _width(module: nn.Module) -> int:
    return getattr(module, "out_features", getattr(module, "out_channels", 0))


def _plan_groups(
    pruner,
    names: dict[nn.Module, str],
    ignored: dict[nn.Module, str],
    leaves: Tensor | tuple[Tensor, ...],
    config: ChannelPruning,
    report: StructuralReport,
    tied: list,
) -> list[str]:
    """Sort the dependency groups into prunable ones and kept ones (with reasons); returns prunable layer names.

    Groups tied to a model input, without BatchNorm under ``importance="bn"``, or reaching a tied weight (see
    :func:`_tied_parameters`) that another group reaches too, are added to the pruner's ignored layers here, so a
    global ranking only counts channels that can really go.
    """
    graph = pruner.DG
    inputs = as_list(leaves)
    candidates: list[str] = []
    # q/k/v projections (kept here: heads are their unit) are not roots: a q/k group runs through rotary position
    # embeddings (slices + concatenation), where Torch-Pruning's index mapping never converges.
    model = next(module for module, name in names.items() if name == "")
    qkv = [p for projections in qkv_projections(model).values() for p in projections if p in ignored]
    groups = list(graph.get_all_groups(ignored_layers=qkv, root_module_types=pruner.root_module_types))
    reasons = [_group_kept_reason(graph, group, names, ignored, inputs, config) for group in groups]
    shared = _shared_across_groups([g for g, r in zip(groups, reasons, strict=True) if r is None], tied)
    for group, reason in zip(groups, reasons, strict=True):
        owners = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        layers = [m for m in owners if isinstance(m, LAYERS) and m in names]
        tied_name = next((shared[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in shared), None)
        if reason is None and tied_name is not None:
            reason = (
                f"its channels run through the tied weight {tied_name}, which other dependency groups prune too "
                "(e.g. one embedding shared by an encoder and a decoder): pruned differently it could not stay one "
                "tensor"
            )
        if reason is None:
            candidates += [names[m] for m in layers]
            continue
        for module in layers:
            if module not in ignored:
                report.skipped.setdefault(names[module], reason)
                pruner.ignored_layers.append(module)
    return candidates


def _group_kept_reason(graph, group, names, ignored, inputs, config: ChannelPruning) -> str | None:
    """Why a dependency group must keep its channels (a kept layer, a model input, no BatchNorm), or None."""
    owners = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
    blocking = next((m for m in owners if m in ignored), None)
    if blocking is not None:
        return f"its output channels are tied to kept layer {names.get(blocking, '?')!r}"
    if any(any(dep.target.module is t for t in inputs) for dep, _ in group):
        return "its output channels are tied to a model input (e.g. a residual add with the input)"
    if config.importance == "bn" and not any(
        isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group
    ):
        return "importance 'bn' needs a BatchNorm on its output channels; there is none"
    return None


def _shared_across_groups(groups: list, tied: list) -> dict[int, str]:
    """``id(module)`` -> tied parameter name, for the holders of each tied parameter reached by several groups."""
    holders = {id(module): index for index, (_, group) in enumerate(tied) for module, _, _ in group}
    reached: dict[int, int] = {}
    for group in groups:
        for index in {holders[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in holders}:
            reached[index] = reached.get(index, 0) + 1
    return {
        id(module): tied[index][1][0][2]
        for index, count in reached.items()
        if count > 1
        for module, _, _ in tied[index][1]
    }


def _capped(pruner, group, config: ChannelPruning):
    """The group Torch-Pruning chose, with no more than ``max_per_layer`` of its channels (least important first).

    Torch-Pruning's global threshold and its ``round_to`` rounding (which rounds kept counts down) can remove more
    than the cap, or a whole small layer.
    """
    graph = pruner.DG
    dep, idxs = group[0]
    module, handler = dep.target.module, dep.handler
    is_out = graph.is_out_channel_pruning_fn(handler)
    channels = graph.get_out_channels(module) if is_out else graph.get_in_channels(module)
    chosen = sorted(set(int(i) for i in idxs))
    limit = max_removable(channels, config.max_per_layer, config.round_to)
    if len(chosen) <= limit:
        return group
    if limit == 0:
        return None
    full = graph.get_pruning_group(module, handler, list(range(channels)))
    scores = pruner.estimate_importance(full)
    if scores is not None and len(scores) == channels:
        chosen = sorted(chosen, key=lambda i: float(scores[i]))
    return graph.get_pruning_group(module, handler, sorted(chosen[:limit]))


def _register_handler() -> None:
    pruning_handler(ChannelPruning)(prune_channels_)


_register_handler()

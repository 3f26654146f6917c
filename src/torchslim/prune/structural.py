"""Structural pruning with physical removal: channels, filters, neurons and attention heads, through Torch-Pruning.

``prune_channels_`` removes whole output channels of ``Conv``/``Linear`` layers and everything that depends on
them (BatchNorm/LayerNorm features, the next layers' inputs, every layer tied by a residual add, the
``flatten -> linear`` expansion). The dependency graph and the surgery are Torch-Pruning's
(``tp.pruner.BasePruner``); this module decides what may be pruned and how much, and reports it:

- the output layer (the layer whose output is the model's output, i.e. the classifier) is never pruned, nor the
  layers named in ``ChannelPruning.ignore`` or refused by ``filter_fn``;
- channels tied to a model input (e.g. ``x + ffn(x)`` on the raw input) are kept, because the input cannot shrink;
- no layer loses more than ``max_per_layer`` of its channels, and kept counts are multiples of ``round_to``.

Attention heads (``ChannelPruning.heads``) are removed whole, by Torch-Pruning's head pruning (``num_heads``,
``prune_num_heads=True``, ``prune_head_dims=False``), from attention modules built the usual way: a ``num_heads``
attribute and separate ``nn.Linear`` query/key/value projections as direct children (named ``q``/``k``/``v``,
``q_proj``/``k_proj``/``v_proj``, ``query``/``key``/``value``, ``to_q``/``to_k``/``to_v``, ``wq``/``wk``/``wv`` or
``q_lin``/``k_lin``/``v_lin``) whose outputs are split into heads. The q/k/v outputs and the output projection's
inputs lose ``head_dim`` channels per removed head; ``head_dim`` and the model width (the residual stream) stay, and
the module's ``num_heads`` is set to the new count (its forward must reshape with ``self.num_heads`` or ``-1``).
Heads are ranked within each attention module (also under ``global_ranking``) and at least one always stays. The
q/k/v projections never lose single channels to ``amount``: heads are their only unit.

``nn.MultiheadAttention`` is kept whole. Its packed ``in_proj_weight`` is ``(3 * E, E)`` and its output projection
``(E, E)``, with ``E`` the model width, so it cannot hold fewer heads of the same ``head_dim`` without shrinking the
residual stream; Torch-Pruning's MultiheadAttention pruner removes ``embed_dim`` channels (the residual width) and
keeps ``num_heads`` (``head_dim`` shrinks), and its head pruning needs Linear q/k/v layers (with an
``nn.MultiheadAttention`` in ``num_heads`` it removes nothing, or fails under global pruning). To prune heads of such a
model, build its attention from separate q/k/v/out ``nn.Linear`` layers. FFN neurons of any transformer block are
pruned normally by ``amount``.

The result is a plain, smaller dense ``nn.Module`` (no masks); ``torchslim.save`` records the new layer shapes in
the manifest and ``torchslim.load`` rebuilds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, MissingDependencyError, ModelError
from torchslim.prune.api import pruning_handler

__all__ = ["IMPORTANCES", "ChannelPruning", "StructuralReport", "prune_channels_"]

IMPORTANCES = ("l1", "l2", "taylor", "bn")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # TP root types (LSTM left out: no artifact codec)
_TAYLOR_BATCHES = 4  # batches of ``data`` whose gradients feed the Taylor importance
_TAYLOR_BATCH_SIZE = 64
# a pruning group with more dependencies than this many per module of the model is not converging (see _bounded_groups)
_GROUP_DEPS_PER_MODULE = 50
# direct nn.Linear children of an attention module that project to queries / keys / values (split into heads)
_QKV_NAMES = (
    ("q", "q_proj", "query", "to_q", "wq", "q_lin"),
    ("k", "k_proj", "key", "to_k", "wk", "k_lin"),
    ("v", "v_proj", "value", "to_v", "wv", "v_lin"),
)
_MHA_REASON = (
    "nn.MultiheadAttention is kept whole: its q/k/v width is the model width (in_proj_weight is (3*E, E)), so it "
    "cannot lose heads without shrinking the residual stream around it; for head pruning build attention from "
    "separate q/k/v/out nn.Linear layers with a num_heads attribute"
)


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


@dataclasses.dataclass
class StructuralReport:
    """What :func:`prune_channels_` did.

    Attributes:
        layers: module name -> ``{"type", "before", "after"}`` weight shapes of every Conv/Linear/norm/embedding
            layer (``after`` differs where channels were removed).
        skipped: Conv/Linear (or attention) module name -> why its output channels (or heads) were kept.
        heads: attention module name -> ``{"type", "before", "after"}`` head counts of every attention module
            (``nn.MultiheadAttention`` and modules with separate q/k/v projections).
        params_before: parameters before pruning.
        params_after: parameters after pruning.
        macs_before: MACs of one sample before pruning (``torchslim.measure.count_macs``).
        macs_after: MACs of one sample after pruning.
        details: the config, the number of dependency groups pruned, and notes (e.g. a changed module type that
            ``torchslim.save`` has no codec for).
    """

    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def macs_ratio(self) -> float:
        """MACs after / before."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def changed(self) -> dict[str, dict[str, Any]]:
        """The rows of :attr:`layers` whose shape changed."""
        return {name: row for name, row in self.layers.items() if row["before"] != row["after"]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, with the two ratios."""
        return {**dataclasses.asdict(self), "params_ratio": self.params_ratio, "macs_ratio": self.macs_ratio}

    def __str__(self) -> str:
        config = self.details.get("config", {})
        head = (
            f"channel pruning ({config.get('importance', '?')}, amount {config.get('amount', '?')}, "
            f"{'global' if config.get('global_ranking') else 'per-layer'}, round_to {config.get('round_to', '?')}"
            f"{', heads ' + str(config['heads']) if config.get('heads') else ''}): "
            f"parameters {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}x), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x)"
        )
        lines = [head]
        for name, row in self.changed.items():
            lines.append(f"  {name} ({row['type']}): {row['before']} -> {row['after']}")
        for name, row in self.heads.items():
            if row["before"] != row["after"]:
                lines.append(f"  {name} ({row['type']}): heads {row['before']} -> {row['after']}")
        unchanged = len(self.layers) - len(self.changed)
        if unchanged:
            lines.append(f"  {unchanged} layer(s) unchanged")
        lines += [f"  kept {name}: {reason}" for name, reason in self.skipped.items()]
        lines += [f"  note: {note}" for note in self.details.get("notes", [])]
        return "\n".join(lines)


# --- public verb ----------------------------------------------------------------------------------------------
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
    tp = _torch_pruning()
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

    from torchslim.measure import count_macs, parameter_stats

    names = {module: name for name, module in model.named_modules()}
    modes = {module: module.training for module in model.modules()}
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    report = StructuralReport(details={"config": config.to_dict(), "notes": []})
    report.params_before = parameter_stats(model)["parameters"]
    report.macs_before = count_macs(model, inputs)
    before = _layer_shapes(model)
    attention = _attention_modules(model)
    report.heads = _head_counts(model, attention)
    tied = _tied_parameters(model)
    with _bounded_groups(tp, model):
        try:
            model.eval()  # tracing and importance use the deployed function; BatchNorm statistics are not touched
            for param in model.parameters():
                param.requires_grad_(True)  # the dependency graph is traced through autograd
            out_shapes = _output_shapes(model, inputs)
            ignored = _ignored_layers(model, config, filter_fn, _output_layers(model, inputs), report)
            gradients = False
            if config.heads > 0:
                head_pruner, plan = _plan_heads(tp, model, inputs, attention, ignored, names, config, report)
                if config.importance == "taylor":
                    _accumulate_gradients(model, data, loss_fn)
                    gradients = True
                report.details["head_groups_pruned"] = _prune_heads(head_pruner, plan, model, inputs)
            # heads are the only unit of q/k/v (also of attention whose heads cannot be pruned, e.g. grouped-query
            # attention); ``amount`` never splits them
            for name, projections in _qkv_projections(model).items():
                for proj in projections:
                    if proj not in ignored:
                        ignored[proj] = (
                            f"projection of attention {name!r}: loses whole heads only (ChannelPruning.heads)"
                        )
                        report.skipped.setdefault(names[proj], ignored[proj])
            leaves = _leaf_inputs(inputs)
            try:
                pruner = tp.pruner.BasePruner(
                    model,
                    leaves,
                    importance=_importance(tp, config.importance),
                    global_pruning=config.global_ranking,
                    pruning_ratio=config.amount,
                    max_pruning_ratio=config.max_per_layer,
                    ignored_layers=list(ignored),
                    round_to=config.round_to if config.round_to > 1 else None,
                    root_module_types=list(_LAYERS),
                    forward_fn=_call,
                    unwrapped_parameters=[(t, 1 if t.dim() > 1 else 0) for t in _as_list(leaves) if t.requires_grad],
                )
            except Exception as exc:  # tracing runs user code; Torch-Pruning raises assorted types
                raise ModelError(f"prune_channels_: cannot trace the model's dependency graph: {exc}") from exc
            candidates = _plan_groups(pruner, names, ignored, leaves, config, report)
            if config.amount > 0 and not candidates and not report.details.get("head_groups_pruned"):
                raise ConfigError(
                    f"ChannelPruning(amount={config.amount}, importance={config.importance!r}): nothing in the model "
                    "can be pruned: " + "; ".join(f"{n}: {r}" for n, r in report.skipped.items())
                )
            if config.importance == "taylor" and not gradients:
                _accumulate_gradients(model, data, loss_fn)
            pruned_groups = 0
            for group in pruner.step(interactive=True):
                group = _capped(pruner, group, config)
                if group is not None and pruner.DG.check_pruning_group(group):
                    group.prune()
                    pruned_groups += 1
            report.details["groups_pruned"] = pruned_groups
        finally:
            for module, training in modes.items():
                module.training = training
            for name, param in model.named_parameters():
                param.grad = None
                param.requires_grad_(grad_flags.get(name, True))
    _retie_(model, tied)
    new_shapes = _output_shapes(model, inputs)
    if new_shapes != out_shapes:  # pragma: no cover - a Torch-Pruning bug would land here
        raise ModelError(f"prune_channels_: the model's output shapes changed from {out_shapes} to {new_shapes}")
    after = _layer_shapes(model)
    report.layers = {
        name: {"type": kind, "before": shape, "after": after.get(name, (kind, None))[1]}
        for name, (kind, shape) in before.items()
    }
    for name, row in _head_counts(model, attention).items():
        report.heads[name]["after"] = row["after"]
    for name in candidates:
        row = report.layers.get(name)
        if row is not None and row["before"][0] == row["after"][0] and name not in report.skipped:
            report.skipped[name] = (
                "no channel removed: all ranked above the global threshold"
                if config.global_ranking
                else f"no channel removed: amount {config.amount}, round_to {config.round_to} and max_per_layer "
                f"{config.max_per_layer} leave all {row['before'][0]} channels"
            )
    report.params_after = parameter_stats(model)["parameters"]
    report.macs_after = count_macs(model, inputs)
    report.details["notes"] += _codec_notes(model, report)
    return report


# --- analysis -------------------------------------------------------------------------------------------------
def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        raise MissingDependencyError(
            f"structural pruning needs Torch-Pruning: pip install torch-pruning ({exc})"
        ) from exc
    return torch_pruning


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


@contextlib.contextmanager
def _bounded_groups(tp, model: nn.Module) -> Iterator[None]:
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


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _as_list(inputs: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    return [inputs] if isinstance(inputs, Tensor) else list(inputs)


def _tensors(output: Any) -> Iterator[Tensor]:
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


def _output_shapes(model: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in _tensors(_call(model, inputs))]
    finally:
        for module, training in modes.items():
            module.training = training


def _output_layers(model: nn.Module, inputs: Any) -> list[nn.Module]:
    """Conv/Linear layers whose output (or a view of it) is a model output; else the last Linear run."""
    calls: list[tuple[nn.Module, Any]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
        for m in model.modules()
        if isinstance(m, _LAYERS)
    ]
    try:
        with torch.no_grad():
            outputs = list(_tensors(_call(model, inputs)))
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
            keep(module, name, _MHA_REASON)
        elif isinstance(module, _LAYERS) and filter_fn is not None and module not in ignored:
            if not filter_fn(module, name):
                keep(module, name, "filter_fn returned False")
    return ignored


def _width(module: nn.Module) -> int:
    return getattr(module, "out_features", getattr(module, "out_channels", 0))


def _leaf_inputs(inputs: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """Copies of the inputs; float ones require grad so the graph shows which channels an input feeds."""

    def leaf(t: Tensor) -> Tensor:
        t = t.detach().clone()
        return t.requires_grad_(True) if t.is_floating_point() else t

    return leaf(inputs) if isinstance(inputs, Tensor) else tuple(leaf(t) for t in inputs)


def _importance(tp, name: str):
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.BNScaleImportance()


def _plan_groups(
    pruner,
    names: dict[nn.Module, str],
    ignored: dict[nn.Module, str],
    leaves: Tensor | tuple[Tensor, ...],
    config: ChannelPruning,
    report: StructuralReport,
) -> list[str]:
    """Sort the dependency groups into prunable ones and kept ones (with reasons); returns prunable layer names.

    Groups tied to a model input, or without BatchNorm under ``importance="bn"``, are added to the pruner's
    ignored layers here, so a global ranking only counts channels that can really go.
    """
    graph = pruner.DG
    inputs = _as_list(leaves)
    candidates: list[str] = []
    # q/k/v projections (kept here: heads are their unit) are not roots: a q/k group runs through rotary position
    # embeddings (slices + concatenation), where Torch-Pruning's index mapping never converges.
    model = next(module for module, name in names.items() if name == "")
    qkv = [p for projections in _qkv_projections(model).values() for p in projections if p in ignored]
    for group in graph.get_all_groups(ignored_layers=qkv, root_module_types=pruner.root_module_types):
        owners = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        layers = [m for m in owners if isinstance(m, _LAYERS) and m in names]
        blocking = next((m for m in owners if m in ignored), None)
        reason = None
        if blocking is not None:
            reason = f"its output channels are tied to kept layer {names.get(blocking, '?')!r}"
        elif any(any(dep.target.module is t for t in inputs) for dep, _ in group):
            reason = "its output channels are tied to a model input (e.g. a residual add with the input)"
        elif config.importance == "bn" and not any(
            isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group
        ):
            reason = "importance 'bn' needs a BatchNorm on its output channels; there is none"
        if reason is None:
            candidates += [names[m] for m in layers]
            continue
        for module in layers:
            if module not in ignored:
                report.skipped.setdefault(names[module], reason)
                pruner.ignored_layers.append(module)
    return candidates


def _accumulate_gradients(model: nn.Module, data: Any, loss_fn: Callable | None) -> None:
    """Sum ``dL/dw`` over the first few batches of ``data`` (model in eval mode) for Taylor importance."""
    from torchslim.train import default_loss

    loss_fn = loss_fn or default_loss
    source = getattr(data, "train", data)
    if isinstance(source, Dataset) and not isinstance(source, DataLoader):
        source = DataLoader(source, batch_size=_TAYLOR_BATCH_SIZE, shuffle=False)
    if not isinstance(source, DataLoader):
        raise DataError(
            f"ChannelPruning(importance='taylor'): data is a {type(data).__name__}: expected a DataLoader, a "
            "Dataset of (inputs, targets) or DataSplits"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    seen = 0
    for batch in source:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DataError("ChannelPruning(importance='taylor'): data must yield (inputs, targets) batches")
        loss = loss_fn(model, batch[0].to(device), batch[1].to(device))
        loss.backward()
        seen += 1
        if seen >= _TAYLOR_BATCHES:
            break
    if not seen:
        raise DataError("ChannelPruning(importance='taylor'): data yielded no batch")


# --- attention heads ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Attention:
    """An attention module whose heads can be removed: separate q/k/v ``nn.Linear`` projections split into heads."""

    module: nn.Module
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]
    num_heads: int
    head_dim: int


def _attention_modules(model: nn.Module) -> dict[str, _Attention]:
    """Module name -> :class:`_Attention` for every module with an int ``num_heads`` and q/k/v Linear children.

    Projections must have the same output width (grouped-query attention is not supported), divisible by
    ``num_heads``; a fused ``qkv`` projection is not recognised.
    """
    found = {}
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(module, nn.MultiheadAttention) or not isinstance(heads, int) or isinstance(heads, bool):
            continue
        children = dict(module.named_children())
        projections = []
        for choices in _QKV_NAMES:
            hits = [children[c] for c in choices if isinstance(children.get(c), nn.Linear)]
            if len(hits) == 1:
                projections.append(hits[0])
        widths = {proj.out_features for proj in projections}
        if heads < 1 or len(projections) != 3 or len(widths) != 1 or widths.pop() % heads:
            continue
        q, k, v = projections
        found[name] = _Attention(module, (q, k, v), heads, q.out_features // heads)
    return found


def _head_counts(model: nn.Module, attention: dict[str, _Attention]) -> dict[str, dict[str, Any]]:
    """Attention module name -> ``{"type", "before", "after"}`` with its current head count in both."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or name in attention:
            rows[name] = {"type": type(module).__name__, "before": module.num_heads, "after": module.num_heads}
    return rows


def _plan_heads(
    tp,
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    attention: dict[str, _Attention],
    ignored: dict[nn.Module, str],
    names: dict[nn.Module, str],
    config: ChannelPruning,
    report: StructuralReport,
):
    """Trace the graph for head pruning and decide how many heads each attention module loses.

    Returns:
        ``(pruner, plan)``: a Torch-Pruning ``BasePruner`` that only removes whole heads of the planned modules, and
        attention module name -> (:class:`_Attention`, heads to remove).

    Raises:
        ConfigError: no attention module can lose a head (the reasons are listed).
        ModelError: the graph cannot be traced.
    """
    plan: dict[str, tuple[_Attention, int]] = {}
    for name, att in attention.items():
        blocking = next((m for m in (att.module, *att.projections) if m in ignored), None)
        removable = min(
            math.ceil(config.heads * att.num_heads - 1e-9), max_removable(att.num_heads, config.max_per_layer, 1)
        )
        if blocking is not None:
            report.skipped.setdefault(name, f"heads kept: {names[blocking]!r} is kept ({ignored[blocking]})")
        elif removable < 1:
            report.skipped.setdefault(
                name,
                f"heads kept: heads {config.heads} and max_per_layer {config.max_per_layer} remove none of its "
                f"{att.num_heads} head(s) (at least one stays)",
            )
        else:
            plan[name] = (att, removable)
    pruner = None
    if plan:
        leaves = _leaf_inputs(inputs)
        heads = {proj: att.num_heads for att, _ in plan.values() for proj in att.projections}
        try:
            pruner = tp.pruner.BasePruner(
                model,
                leaves,
                importance=_importance(tp, config.importance),
                global_pruning=False,  # heads are ranked within each attention module
                # any ratio > 0 opens the attention groups; prune_head_dims=False removes whole heads only, and every
                # other layer is ignored in this pass
                pruning_ratio=0.5,
                ignored_layers=[m for m in model.modules() if isinstance(m, _LAYERS) and m not in heads],
                root_module_types=list(_LAYERS),
                forward_fn=_call,
                unwrapped_parameters=[(t, 1 if t.dim() > 1 else 0) for t in _as_list(leaves) if t.requires_grad],
                num_heads=heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=config.heads,
                # Torch-Pruning removes ceil(ratio * num_heads) heads: this ratio gives exactly ``removable``
                head_pruning_ratio_dict={att.module: (n - 0.5) / att.num_heads for att, n in plan.values()},
            )
        except Exception as exc:  # tracing runs user code; Torch-Pruning raises assorted types
            raise ModelError(f"prune_channels_: cannot trace the model's dependency graph: {exc}") from exc
        _check_head_groups(pruner, plan, names, leaves, config, report)
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


def _qkv_projections(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear, nn.Linear]]:
    """Module name -> its q/k/v ``nn.Linear`` children, for every module that has all three (heads or not)."""
    found = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        projections = [next((children[c] for c in choices if isinstance(children.get(c), nn.Linear)), None)
                       for choices in _QKV_NAMES]
        if all(p is not None for p in projections):
            found[name] = tuple(projections)
    return found


def _unsupported_attention(model: nn.Module) -> str:
    """Why modules with q/k/v ``nn.Linear`` children were not taken (grouped-query attention ...), or ``""``."""
    reasons = []
    for name, projections in _qkv_projections(model).items():
        module = model.get_submodule(name)
        widths = [p.out_features for p in projections]
        heads = getattr(module, "num_heads", None)
        if len(set(widths)) > 1:
            reasons.append(f"{name}: grouped-query attention (q/k/v widths {widths}) is not supported")
        elif not isinstance(heads, int) or isinstance(heads, bool):
            reasons.append(f"{name}: no int num_heads attribute")
    if len(reasons) > 2:
        reasons = [*reasons[:2], f"and {len(reasons) - 2} more"]
    return "; ".join(reasons)


def _check_head_groups(
    pruner,
    plan: dict[str, tuple[_Attention, int]],
    names: dict[nn.Module, str],
    leaves: Tensor | tuple[Tensor, ...],
    config: ChannelPruning,
    report: StructuralReport,
) -> None:
    """Drop from ``plan`` (and ignore) the attention modules whose q/k/v outputs do not form one clean group.

    A head can only go if the traced graph ties the q, k and v outputs together (as attention does) and to no other
    layer's outputs or to a model input.
    """
    graph = pruner.DG
    inputs = _as_list(leaves)
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
        layers = {m for m in owners if m in names and isinstance(m, _LAYERS)}
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


def _prune_heads(pruner, plan: dict[str, tuple[_Attention, int]], model: nn.Module, inputs: Any) -> int:
    """Run the head pass; set each module's ``num_heads``; returns the number of groups pruned.

    Raises:
        ModelError: the projections disagree with the new head count, or the forward fails afterwards.
    """
    pruned = 0
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            if pruner.DG.check_pruning_group(group):
                group.prune()
                pruned += 1
    for name, (att, _) in plan.items():
        heads = pruner.num_heads[att.projections[0]]
        widths = [proj.out_features for proj in att.projections]
        if widths != [heads * att.head_dim] * 3:  # pragma: no cover - a Torch-Pruning bug would land here
            raise ModelError(
                f"prune_channels_: attention {name!r} has q/k/v widths {widths} after head pruning, expected "
                f"{heads} heads of {att.head_dim}"
            )
        att.module.num_heads = heads
    try:
        _output_shapes(model, inputs)
    except Exception as exc:
        raise ModelError(
            f"prune_channels_: the model's forward fails after removing attention heads ({exc}): attention "
            f"modules ({', '.join(plan)}) must reshape q/k/v with self.num_heads (or -1) and a fixed head_dim"
        ) from exc
    return pruned


# --- decision -------------------------------------------------------------------------------------------------
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


# --- reporting ------------------------------------------------------------------------------------------------
def _layer_shapes(model: nn.Module) -> dict[str, tuple[str, list[int]]]:
    """Module name -> (type name, weight shape) for every module with a weight (attention: its embed width)."""
    rows = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, Tensor):
            rows[name] = (type(module).__name__, list(weight.shape))
        elif isinstance(module, nn.MultiheadAttention):
            rows[name] = (type(module).__name__, [module.embed_dim])
    return rows


def _codec_notes(model: nn.Module, report: StructuralReport) -> list[str]:
    from torchslim.artifact.codecs import codec_for

    modules = dict(model.named_modules())
    notes = []
    for name, row in report.heads.items():
        module = modules.get(name)
        if row["before"] != row["after"] and module is not None and codec_for(module) is None:
            notes.append(
                f"{name} ({row['type']}) now has num_heads={row['after']}: torchslim.save records its projections' "
                f"new shapes but not num_heads, so torchslim.load rebuilds it with {row['before']} heads; register a "
                "codec for it (torchslim.artifact.register_module_codec) unless its forward infers the head count "
                "(e.g. view(batch, tokens, -1, head_dim))"
            )
    for name in report.changed:
        module = modules.get(name)
        if module is not None and codec_for(module) is None:
            notes.append(
                f"{name} ({type(module).__name__}) changed shape but has no artifact codec: torchslim.save will "
                "refuse the model until one is registered (torchslim.artifact.register_module_codec)"
            )
    return notes


def _register_handler() -> None:
    pruning_handler(ChannelPruning)(prune_channels_)


_register_handler()

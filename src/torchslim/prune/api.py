"""Pruning configs and the in-place verbs ``prune_`` and ``finalize_``.

Unstructured pruning attaches masks with ``torch.nn.utils.prune`` (so fine-tuning keeps pruned
weights at zero); ``finalize_`` makes them permanent, writing exact ``0.0`` (never ``-0.0``) so the
``.slim`` file stores the weights sparse. Structural pruning removes channels physically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError
from torchslim.models.checks import check_finite_weights, check_inputs_fit
from torchslim.onload import materialize_
from torchslim.prune import importance, unstructured

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
SCOPES = ("global", "layer", "neuron")


@register_config("magnitude")
@dataclasses.dataclass(frozen=True)
class MagnitudePruning(Config):
    """Unstructured pruning by the seed's rule ``W' = W if score(W) > tau else 0``.

    Give exactly one of ``threshold``, ``amount`` or (scope ``"neuron"`` only) ``std_multiplier``.

    Args:
        scope: ``"global"`` (one tau over all prunable weights), ``"layer"`` (per layer) or
            ``"neuron"`` (the seed's local pruning: each output neuron/channel on its own weights).
        threshold: tau, compared with the score (``|w|`` for ``l1``, ``w**2`` for ``l2``,
            ``|w * dL/dw|`` for ``taylor``).
        amount: fraction of weights removed (globally, per layer, or per neuron), in ``[0, 1)``.
        std_multiplier: neuron scope: tau of a neuron = lambda * std of its weights.
        criterion: ``"l1"``, ``"l2"`` or ``"taylor"`` (needs data).
    """

    stage = "prune"
    stage_default = True

    scope: str = "global"
    threshold: float | None = None
    amount: float | None = None
    std_multiplier: float | None = None
    criterion: str = "l1"

    def validate(self) -> None:
        self.check_choice("scope", SCOPES)
        self.check_choice("criterion", importance.CRITERIA)
        given = [f for f in ("threshold", "amount", "std_multiplier") if getattr(self, f) is not None]
        if len(given) != 1:
            raise self.fail("threshold/amount/std_multiplier", tuple(getattr(self, f) for f in given) or None,
                            "exactly one of threshold, amount, std_multiplier")
        if self.threshold is not None:
            self.check_float("threshold", 0.0)
        if self.amount is not None:
            self.check_float("amount", 0.0, 1.0, hi_inclusive=False)
        if self.std_multiplier is not None:
            self.check_float("std_multiplier", 0.0, lo_inclusive=False)
            if self.scope != "neuron":
                raise self.fail("std_multiplier", self.std_multiplier, "None unless scope='neuron'")


@register_config("nm")
@dataclasses.dataclass(frozen=True)
class NMSparsity(Config):
    """N:M semi-structured sparsity: ``n`` of every ``m`` consecutive input weights are kept (2:4 ...).

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group length along the input dimension (2..32).
        criterion: ``"l1"``, ``"l2"`` or ``"taylor"``.
    """

    stage = "prune"

    n: int = 2
    m: int = 4
    criterion: str = "l1"

    def validate(self) -> None:
        self.check_int("m", 2, 32)
        self.check_int("n", 1, self.m - 1 if isinstance(self.m, int) else None)
        self.check_choice("criterion", importance.CRITERIA)


@dataclasses.dataclass
class PruneReport:
    """Per-layer sparsity after pruning, the threshold used, and the layers left alone (with why).

    Every pruning handler returns one (``ChannelPruning``: the subclass ``StructuralReport``).
    """

    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    threshold: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Zeros / elements over all pruned layers' weights."""
        total = sum(r["numel"] for r in self.layers.values())
        return sum(r["zeros"] for r in self.layers.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (with the overall sparsity)."""
        return {**dataclasses.asdict(self), "sparsity": self.sparsity}

    def __str__(self) -> str:
        lines = [f"sparsity {self.sparsity:.2%} over {len(self.layers)} layer(s)"
                 + ("" if self.threshold is None else f", tau = {self.threshold:.6g}")]
        lines += [f"  {n}: {r['zeros']:,}/{r['numel']:,} zero ({r['sparsity']:.2%})" for n, r in self.layers.items()]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


Handler = Callable[..., PruneReport]
_HANDLERS: dict[type[Config], Handler] = {}


def pruning_handler(config_type: type[Config]) -> Callable[[Handler], Handler]:
    """Decorator: register ``fn(model, config, **context) -> PruneReport`` for a config class."""

    def decorate(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return decorate


def prune_(
    model: nn.Module,
    config: Config,
    *,
    example_inputs: torch.Tensor | None = None,
    data: Any = None,
    loss_fn: Callable | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> PruneReport:
    """Prune ``model`` in place.

    Args:
        model: the model (float Linear/Conv layers are pruned; quantized layers are skipped).
        config: ``MagnitudePruning``, ``NMSparsity`` or ``ChannelPruning``.
        example_inputs: a batch of inputs (needed by ``ChannelPruning``).
        data: labelled data for gradient-based criteria (``taylor``).
        loss_fn: ``loss_fn(model, inputs, targets)`` for ``taylor`` (cross-entropy by default).
        filter_fn: ``filter_fn(module, name) -> bool``; layers for which it is false are skipped.

    Returns:
        A :class:`PruneReport` (``MagnitudePruning``, ``NMSparsity``: unstructured masks stay attached, so
        fine-tuning keeps zeros at zero, until :func:`finalize_`; ``torchslim.save`` needs the model finalized),
        or its subclass :class:`~torchslim.prune.structural.StructuralReport` (``ChannelPruning``: layers rebuilt
        smaller; its ``sparsity`` is the fraction of parameters removed).

    Raises:
        ConfigError: unknown config type, or nothing to prune.
        ModelError: a parameter of the model holds NaN/Inf (checked before anything changes).
        DataError: ``taylor`` without data, or ``example_inputs`` that do not fit the model.
    """
    handler = _HANDLERS.get(type(config))  # torchslim.prune's __init__ imports structural.py, which registers its own
    if handler is None:
        raise ConfigError(f"config = {type(config).__name__} is invalid for prune_: expected one of "
                          f"{', '.join(c.__name__ for c in _HANDLERS)}")
    materialize_(model)  # pruning reads every weight (a lazily loaded model is read whole)
    check_finite_weights(model, "prune_")
    if example_inputs is not None:
        check_inputs_fit(model, example_inputs, "prune_")
    return handler(model, config, example_inputs=example_inputs, data=data, loss_fn=loss_fn, filter_fn=filter_fn)


def prunable_layers(model: nn.Module, filter_fn: Callable | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers unstructured pruning applies to, and the parameterised layers it leaves (with why)."""
    layers, skipped = {}, {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, PRUNABLE):
            if filter_fn is not None and not filter_fn(module, name):
                skipped[name] = "filter_fn returned False"
            elif torch.nn.utils.parametrize.is_parametrized(module, "weight"):
                skipped[name] = (f"{type(module).__name__} weight is parametrized (e.g. weight_norm): torch's pruning "
                                 "masks cannot wrap it")
            else:
                layers[name] = module
        elif hasattr(module, "slim_stats"):
            skipped[name] = f"{type(module).__name__} holds compressed weights: prune before quantizing"
        elif any(True for _ in module.parameters(recurse=False)):
            skipped[name] = f"{type(module).__name__} is not pruned (only Linear/Conv weights are)"
    if not layers:
        raise ConfigError("prune_: the model has no Linear/Conv layer to prune (after filter_fn)")
    return layers, skipped


def _scores(model, layers, criterion, data, loss_fn) -> dict[str, torch.Tensor]:
    if criterion == "taylor":
        return importance.taylor_scores(model, layers, data, loss_fn=loss_fn)
    return {
        name: importance.magnitude_scores(importance.effective_weight(module), criterion)
        for name, module in layers.items()
    }


@pruning_handler(MagnitudePruning)
def _magnitude(model, config: MagnitudePruning, *, data=None, loss_fn=None, filter_fn=None, **_) -> PruneReport:
    layers, skipped = prunable_layers(model, filter_fn)
    scores = _scores(model, layers, config.criterion, data, loss_fn)
    tau = None
    if config.scope == "global":
        masks, tau = unstructured.global_masks(scores, threshold=config.threshold, amount=config.amount)
    elif config.scope == "layer":
        masks = unstructured.layer_masks(scores, threshold=config.threshold, amount=config.amount)
        tau = config.threshold
    else:
        weights = {name: importance.effective_weight(module) for name, module in layers.items()}
        masks = unstructured.neuron_masks(scores, threshold=config.threshold, amount=config.amount,
                                          std_multiplier=config.std_multiplier, weights=weights)
        tau = config.threshold
    return _apply_masks(layers, masks, skipped, tau)


@pruning_handler(NMSparsity)
def _nm(model, config: NMSparsity, *, data=None, loss_fn=None, filter_fn=None, **_) -> PruneReport:
    layers, skipped = prunable_layers(model, filter_fn)
    for name in [n for n, m in layers.items() if m.weight[0].numel() % config.m]:
        skipped[name] = f"input dimension {layers.pop(name).weight[0].numel()} is not a multiple of m = {config.m}"
    if not layers:
        raise ConfigError(f"NMSparsity {config.n}:{config.m}: no layer has an input dimension divisible by {config.m}")
    scores = _scores(model, layers, config.criterion, data, loss_fn)
    masks = {name: unstructured.nm_mask(s, config.n, config.m) for name, s in scores.items()}
    report = _apply_masks(layers, masks, skipped, None)
    report.details["pattern"] = f"{config.n}:{config.m}"
    return report


def _apply_masks(layers, masks, skipped, tau) -> PruneReport:
    report = PruneReport(skipped=skipped, threshold=tau)
    for name, module in layers.items():
        # On an already-pruned layer torch's PruningContainer ANDs the masks: pruning only removes more.
        torch_prune.custom_from_mask(module, "weight", masks[name].to(module.weight.device))
        numel = module.weight_mask.numel()
        zeros = int((module.weight_mask == 0).sum())
        report.layers[name] = {"shape": list(module.weight.shape), "numel": numel, "zeros": zeros,
                               "sparsity": zeros / numel}
    return report


def finalize_(model: nn.Module) -> int:
    """Make pruning permanent: remove masks and write exact zeros into the weights.

    Args:
        model: a model pruned by :func:`prune_` (or ``torch.nn.utils.prune``).

    Returns:
        How many layers were finalized (0 if there were no masks).
    """
    count = 0
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                mask = getattr(module, name + "_mask").bool()
                torch_prune.remove(module, name)
                with torch.no_grad():  # orig * 0 gives -0.0 for negative weights; store true zeros
                    getattr(module, name).masked_fill_(~mask, 0.0)
                count += 1
    return count


def layer_sparsity(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Zeros per Linear/Conv weight: ``{name: {"numel", "zeros", "sparsity"}}`` (effective weights)."""
    table = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            weight = importance.effective_weight(module).detach()
            zeros = int((weight == 0).sum())
            table[name] = {"numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
    return table

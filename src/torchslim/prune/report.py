"""What structural pruning did: :class:`StructuralReport` and the shape records it is built from."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from torchslim.prune.api import PruneReport

__all__ = ["StructuralReport", "finish_report", "layer_shapes"]


@dataclasses.dataclass
class StructuralReport(PruneReport):
    """What :func:`~torchslim.prune.channels.prune_channels_` did: a :class:`~torchslim.prune.PruneReport` with the
    structural details.

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
        details: the config, the number of dependency groups pruned, and ``notes`` (remarks for the user).
        threshold: always None (no magnitude threshold).
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
    def sparsity(self) -> float:
        """The fraction of the parameters removed (``1 - params_ratio``): structural pruning leaves no zeros."""
        return 1.0 - self.params_ratio

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
        """JSON-safe dict, with the two ratios and the sparsity."""
        return {**dataclasses.asdict(self), "sparsity": self.sparsity, "params_ratio": self.params_ratio,
                "macs_ratio": self.macs_ratio}

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


def layer_shapes(model: nn.Module) -> dict[str, tuple[str, list[int]]]:
    """Module name -> (type name, weight shape) for every module with a weight (attention: its embed width)."""
    rows = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, Tensor):
            rows[name] = (type(module).__name__, list(weight.shape))
        elif isinstance(module, nn.MultiheadAttention):
            rows[name] = (type(module).__name__, [module.embed_dim])
    return rows


def finish_report(
    report: StructuralReport,
    before: dict[str, tuple[str, list[int]]],
    after: dict[str, tuple[str, list[int]]],
    heads_after: dict[str, dict[str, Any]],
    candidates: list[str],
    config: Any,
) -> None:
    """Fill ``report.layers`` and the heads' ``after`` counts; say why prunable layers kept every channel.

    Args:
        report: the report being built.
        before: :func:`layer_shapes` before pruning.
        after: :func:`layer_shapes` after pruning.
        heads_after: attention module name -> ``{"after": count, ...}`` after pruning.
        candidates: names of the layers the channel pass could prune.
        config: the ``ChannelPruning`` config.
    """
    report.layers = {
        name: {"type": kind, "before": shape, "after": after.get(name, (kind, None))[1]}
        for name, (kind, shape) in before.items()
    }
    for name, row in heads_after.items():
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

"""Pruning: the seed's threshold rule (global, per layer, per neuron), N:M, structural removal, schedules."""

from torchslim.prune.api import (
    MagnitudePruning,
    NMSparsity,
    PruneReport,
    finalize_,
    layer_sparsity,
    prunable_layers,
    prune_,
    pruning_handler,
)
from torchslim.prune.schedule import PruneSchedule, ScheduleResult, polynomial_sparsity, prune_with_schedule
from torchslim.prune.structural import ChannelPruning, StructuralReport, prune_channels_
from torchslim.prune.sweep import ThresholdRow, sweep_thresholds

__all__ = [
    "ChannelPruning",
    "MagnitudePruning",
    "NMSparsity",
    "PruneReport",
    "PruneSchedule",
    "ScheduleResult",
    "StructuralReport",
    "ThresholdRow",
    "finalize_",
    "layer_sparsity",
    "polynomial_sparsity",
    "prunable_layers",
    "prune_",
    "prune_channels_",
    "prune_with_schedule",
    "pruning_handler",
    "sweep_thresholds",
]

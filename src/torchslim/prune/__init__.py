"""Pruning: the seed's threshold rule (global, per layer, per neuron), N:M, structural removal."""

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

__all__ = [
    "MagnitudePruning",
    "NMSparsity",
    "PruneReport",
    "finalize_",
    "layer_sparsity",
    "prunable_layers",
    "prune_",
    "pruning_handler",
]

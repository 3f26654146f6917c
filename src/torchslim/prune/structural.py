"""Structural pruning with physical removal: channels, filters, neurons and attention heads, through Torch-Pruning.

The implementation lives in :mod:`torchslim.prune.channels` (:class:`ChannelPruning`, :func:`prune_channels_`),
:mod:`torchslim.prune.heads` (attention heads), :mod:`torchslim.prune.grouped_heads` (heads removed without the
traced graph), :mod:`torchslim.prune.report` (:class:`StructuralReport`) and :mod:`torchslim.prune.graph` (shared
tracing helpers); this module keeps the names it always exported.
"""

from torchslim.prune.channels import IMPORTANCES, ChannelPruning, prune_channels_
from torchslim.prune.graph import max_removable
from torchslim.prune.report import StructuralReport

__all__ = ["IMPORTANCES", "ChannelPruning", "StructuralReport", "max_removable", "prune_channels_"]

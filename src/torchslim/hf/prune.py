"""Structural pruning of transformers: whole attention heads and FFN neurons, nothing else.

The surgery is :func:`torchslim.prune.structural.prune_channels_` (Torch-Pruning's dependency graph). Here it is
restricted to the two units a transformer can lose without touching its residual stream (the model width, tied
to the embeddings and every LayerNorm): ``ChannelPruning.heads`` removes heads from attention modules with
separate q/k/v projections (BERT, RoBERTa, DistilBERT, Llama-style ``q_proj``...), and ``ChannelPruning.amount``
removes neurons of each FFN (the outputs of its first Linear and the inputs of its second). Afterwards
:func:`~torchslim.hf.loading.sync_config_` updates the head counts kept in the attention modules and the
config's FFN width.

GPT-2's fused ``c_attn`` projection holds q, k and v in one Linear; its heads cannot be removed this way (the
error says so) but its FFN neurons can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError
from torchslim.hf.loading import _QKV, attention_modules, ffn_layers, sync_config_

__all__ = ["prune_transformer_"]


def prune_transformer_(
    model: nn.Module,
    config: Any,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    *,
    data: Any = None,
    loss_fn: Callable | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
):
    """Remove attention heads (``config.heads``) and FFN neurons (``config.amount``) from a transformer, in place.

    Args:
        model: an :class:`~torchslim.hf.loading.HFModel` (or any module with recognised attention/FFN layers).
        config: a :class:`torchslim.prune.ChannelPruning`; ``amount`` is the fraction of each FFN's neurons
            removed, ``heads`` the fraction of each attention module's heads; ``round_to``, ``importance``,
            ``global_ranking`` and ``max_per_layer`` apply as usual.
        example_inputs: ``(input_ids, attention_mask)`` (or ``input_ids``) to trace the graph; default: one
            sequence of 8 token ids.
        data: labelled batches for ``importance="taylor"`` (see ``prune_channels_``).
        loss_fn: loss for ``taylor``.
        filter_fn: ``filter_fn(module, name) -> bool``; FFN layers for which it is false keep their neurons.

    Returns:
        The :class:`~torchslim.prune.structural.StructuralReport`.

    Raises:
        ConfigError: ``config`` is not a ChannelPruning, or the model has no FFN layer and no attention module
            that can be pruned (or, with ``heads > 0``, no attention module with separate q/k/v projections).
        DataError, ModelError: as ``prune_channels_``.
    """
    from torchslim.prune.structural import ChannelPruning, prune_channels_

    if not isinstance(config, ChannelPruning):
        raise ConfigError(
            f"config = {type(config).__name__} is invalid for prune_transformer_: expected ChannelPruning"
        )
    for module, n in attention_modules(model).values():  # a user's wrapper of an HF model, not an HFModel
        if not isinstance(getattr(module, "num_heads", None), int):
            module.num_heads = n  # the attribute head pruning reads and updates (HFModel sets it on load)
    ffn = ffn_layers(model)
    projections = {
        id(child)
        for module, _ in attention_modules(model).values()
        for names in _QKV
        for child in [getattr(module, n, None) for n in names]
        if isinstance(child, nn.Linear)
    }
    if config.amount > 0 and not ffn:
        raise ConfigError(
            f"ChannelPruning.amount = {config.amount} is invalid for {type(model).__name__}: it has no recognised "
            "FFN layer (intermediate.dense, mlp.c_fc, mlp.fc1, mlp.up_proj, ffn.lin1): expected amount=0"
        )
    # gated FFNs (Llama, Mistral, Qwen2, Gemma: act(gate_proj(x)) * up_proj(x)): the gate loses the same neurons
    gates = {}
    for name in ffn:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(getattr(parent, "gate_proj", None), nn.Linear):
            gates[id(parent.gate_proj)] = (ffn[name], name)
    allowed = {id(m) for m in ffn.values()} | set(gates) | projections

    def keep_only_units(module: nn.Module, name: str) -> bool:
        if id(module) not in allowed:
            return False
        if filter_fn is None or id(module) in projections:
            return True
        return filter_fn(*gates[id(module)]) if id(module) in gates else filter_fn(module, name)

    if example_inputs is None:
        example_inputs = _default_inputs(model)
    report = prune_channels_(
        model, config, example_inputs, data=data, loss_fn=loss_fn, filter_fn=keep_only_units
    )
    for name in list(report.skipped):
        if report.skipped[name] == "filter_fn returned False" and name not in {n for n in ffn}:
            report.skipped[name] = "transformer pruning removes only attention heads and FFN neurons"
    synced = sync_config_(model)
    report.details["hf"] = synced
    return report


def _default_inputs(model: nn.Module) -> tuple[Tensor, Tensor]:
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    ids = (torch.arange(8) % max(vocab, 1)).unsqueeze(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return ids.to(device), torch.ones_like(ids)

"""Masks for unstructured pruning: global / per-layer / per-neuron thresholds and N:M patterns.

Decision only: functions take scores and return boolean keep-masks; ``api.prune_`` applies them.
"""

from __future__ import annotations

import torch

from torchslim.errors import ConfigError


def keep_fraction_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask that removes exactly ``round(amount * numel)`` lowest-scoring elements.

    Args:
        scores: any shape.
        amount: fraction to remove, in ``[0, 1)``.

    Returns:
        Boolean mask, True where kept (ties broken by position, so the count is exact).
    """
    flat = scores.reshape(-1)
    remove = int(round(amount * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if remove:
        keep[torch.argsort(flat, stable=True)[:remove]] = False
    return keep.reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], *, threshold: float | None = None,
                 amount: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """One threshold over all layers: keep ``score > tau``.

    Args:
        scores: layer name -> scores.
        threshold: tau, compared directly with the scores (the seed's rule for L1 scores).
        amount: alternatively, the global fraction to remove; tau is then the largest removed score.

    Returns:
        ``(masks, tau)``.
    """
    if threshold is not None:
        return {name: s > threshold for name, s in scores.items()}, float(threshold)
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    keep = keep_fraction_mask(flat, amount or 0.0)
    tau = float(flat[~keep].max()) if bool((~keep).any()) else float("-inf")
    masks, offset = {}, 0
    for name in names:
        count = scores[name].numel()
        masks[name] = keep[offset : offset + count].reshape(scores[name].shape)
        offset += count
    return masks, tau


def layer_masks(scores: dict[str, torch.Tensor], *, threshold: float | None = None,
                amount: float | None = None) -> dict[str, torch.Tensor]:
    """Per-layer decision: the same tau for each layer, or the same fraction removed from each."""
    if threshold is not None:
        return {name: s > threshold for name, s in scores.items()}
    return {name: keep_fraction_mask(s, amount or 0.0) for name, s in scores.items()}


def neuron_masks(scores: dict[str, torch.Tensor], *, threshold: float | None = None, amount: float | None = None,
                 std_multiplier: float | None = None, weights: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The seed's *local* pruning: each neuron (output row) judged by its own weights.

    Args:
        scores: layer name -> scores shaped like the weight (output channels first).
        threshold: a fixed tau per neuron (equivalent to the global rule, kept for symmetry).
        amount: the fraction removed from each neuron's own weights.
        std_multiplier: tau of a neuron = lambda * std of that neuron's weights (needs ``weights``).
        weights: layer name -> weights, for ``std_multiplier``.

    Returns:
        layer name -> keep-mask.
    """
    masks = {}
    for name, s in scores.items():
        rows = s.reshape(s.shape[0], -1)
        if threshold is not None:
            keep = rows > threshold
        elif std_multiplier is not None:
            w = weights[name].detach().float().reshape(s.shape[0], -1)
            tau = std_multiplier * w.std(dim=1, unbiased=False, keepdim=True)
            keep = w.abs() > tau
        else:
            keep = torch.stack([keep_fraction_mask(row, amount or 0.0) for row in rows])
        masks[name] = keep.reshape(s.shape)
    return masks


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every ``m`` consecutive weights along the input dimension keep ``n``.

    Args:
        scores: weight scores, output channels first; the input dimension (``in_features`` or
            ``in_channels*kh*kw``) must be a multiple of ``m``.
        n: weights kept per group.
        m: group length.

    Returns:
        Keep-mask shaped like ``scores``.

    Raises:
        ConfigError: if the input dimension is not a multiple of ``m``.
    """
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ConfigError(f"N:M = {n}:{m} needs an input dimension divisible by {m}, got {rows.shape[1]}")
    groups = rows.reshape(rows.shape[0], -1, m)
    top = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(scores.shape)


def is_nm_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input weights has at most ``n`` nonzeros."""
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        return False
    return bool(((rows.reshape(rows.shape[0], -1, m) != 0).sum(dim=-1) <= n).all())

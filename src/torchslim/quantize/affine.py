"""Affine integer quantization exactly as the seed writes it: ``W' = floor(W * K + B)``.

With ``K = 1 / scale`` and ``B = zero_point`` this is *floor* rounding, the seed's literal formula;
with ``B = zero_point + 0.5`` it is round-to-nearest (the default). Codes are clamped to the
unsigned range ``[0, 2**bits - 1]`` and dequantized as ``(q - zero_point) * scale``.

Floor rounding always rounds down, so every dequantized weight is at or below the original: the
error lies in ``[0, scale)`` with mean about ``scale / 2`` — a systematic bias that shifts every
layer's output. Nearest rounding has error in ``[-scale/2, scale/2]`` with mean about 0, which is
why it is the default.

Granularity is expressed by viewing a weight as ``(rows, groups, group_size)`` where rows are output
channels and the input dimension (``in_features`` or ``in_channels*kh*kw``) is split into groups:
per-tensor is ``(1, 1, numel)``, per-channel ``(out, 1, fan_in)``, per-group ``(out, fan_in/g, g)``.
Scales and zero points are always shaped ``(rows, groups)``.
"""

from __future__ import annotations

import torch

from torchslim.errors import ConfigError

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "floor")


def qmax_of(bits: int) -> int:
    """Largest unsigned code for ``bits`` bits."""
    return (1 << bits) - 1


def grouped_view(
    weight: torch.Tensor, granularity: str, group_size: int | None = None, pad: bool = False
) -> torch.Tensor:
    """View ``weight`` as ``(rows, groups, group_size)`` for the given granularity.

    Args:
        weight: a Linear/Conv weight (output channels first) or any tensor for ``"tensor"``.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        group_size: elements per group along the input dimension (``"group"`` only).
        pad: when the group size does not divide the input dimension, pad each row with zeros to
            the next multiple (the last group is partial) instead of raising.

    Returns:
        A 3-D view (or padded copy) of the weight.

    Raises:
        ConfigError: unknown granularity, or a group size that does not divide the input dimension
            while ``pad`` is false.
    """
    if granularity == "tensor":
        return weight.reshape(1, 1, -1)
    rows = weight.shape[0]
    matrix = weight.reshape(rows, -1)
    if granularity == "channel":
        return matrix.unsqueeze(1)
    if granularity == "group":
        fan_in = matrix.shape[1]
        if group_size and fan_in % group_size and pad:
            matrix = torch.nn.functional.pad(matrix, (0, group_size - fan_in % group_size))
            fan_in = matrix.shape[1]
        if not group_size or fan_in % group_size:
            raise ConfigError(
                f"group_size = {group_size!r} is invalid for a weight of shape {tuple(weight.shape)}: "
                f"expected a divisor of its input dimension {fan_in} (or padding on)"
            )
        return matrix.reshape(rows, fan_in // group_size, group_size)
    raise ConfigError(f"granularity = {granularity!r} is invalid: expected one of {', '.join(GRANULARITIES)}")


def compute_qparams(
    grouped: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points for each ``(row, group)`` of a grouped weight.

    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto ``[0, qmax]`` (zero stays exact).
    Symmetric: ``zero_point = 2**(bits-1)`` and ``scale = max|w| / (2**(bits-1) - 1)``.

    Args:
        grouped: tensor shaped ``(rows, groups, group_size)``.
        bits: code width, 2..8.
        symmetric: symmetric (fixed zero point) or asymmetric (min/max) mapping.
        scale_dtype: dtype the scales are stored in; they are rounded to it here so quantization
            uses exactly the scales that dequantization will see.

    Returns:
        ``(scale, zero_point)``, each ``(rows, groups)``; scale in ``scale_dtype``, zero point int32.
    """
    qmax = qmax_of(bits)
    data = grouped.detach().float()
    if symmetric:
        half = 1 << (bits - 1)
        amax = data.abs().amax(dim=-1)
        scale = amax / (half - 1)
        zero_point = torch.full_like(scale, half, dtype=torch.int32)
    else:
        low = data.amin(dim=-1).clamp(max=0)
        high = data.amax(dim=-1).clamp(min=0)
        scale = (high - low) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-low / safe).clamp(0, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    info = torch.finfo(scale_dtype)  # tiny ranges underflow a float16 scale to 0: 1/scale would be inf
    return scale.clamp(min=info.tiny, max=info.max), zero_point


def quantize_affine(
    grouped: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, rounding: str = "nearest"
) -> torch.Tensor:
    """Apply ``q = clamp(floor(W * K + B), 0, qmax)`` with ``K = 1/scale``.

    Args:
        grouped: weights shaped ``(rows, groups, group_size)``.
        scale: ``(rows, groups)`` scales.
        zero_point: ``(rows, groups)`` integer zero points.
        bits: code width, 2..8.
        rounding: ``"nearest"`` (``B = zero_point + 0.5``) or ``"floor"`` (``B = zero_point``).

    Returns:
        uint8 codes with the shape of ``grouped``.

    Raises:
        ConfigError: unknown rounding mode.
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding = {rounding!r} is invalid: expected one of {', '.join(ROUNDINGS)}")
    k = 1.0 / scale.float().unsqueeze(-1)
    b = zero_point.float().unsqueeze(-1) + (0.5 if rounding == "nearest" else 0.0)
    codes = grouped.detach().float() * k  # one temporary, then in place: an lm_head-sized chunk is tens of MB
    return codes.add_(b).floor_().clamp_(0, qmax_of(bits)).to(torch.uint8)


def dequantize_affine(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Return ``(q - zero_point) * scale`` for grouped codes ``(rows, groups, group_size)``."""
    centred = codes.to(torch.float32) - zero_point.to(torch.float32).unsqueeze(-1)
    return (centred * scale.to(torch.float32).unsqueeze(-1)).to(dtype)

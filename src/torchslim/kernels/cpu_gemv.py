"""Integer-weight matrix-vector products on CPU, compiled by inductor (PyTorch's compiler, C++ backend).

A linear layer with k-bit codes ``q`` (k <= 8), scales ``s`` and zero points ``z`` computes
``y = x @ ((q - z) * s)^T``. With the zero point folded out exactly,
``y[n] = sum_g s[n, g] * (x_g . q[n, g]) - sum_g s[n, g] * z[n, g] * sum(x_g)``, the inner products read one
byte per weight, which inductor fuses into one vectorised reduction: at batch 1 a weight read from memory
costs 1/4 of an fp32 weight, so the product is faster than ``F.linear`` once the weight no longer sits in the
cache. The codes are derived from a layer's packed buffers at first use
(:func:`prepack`); the saved file does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchslim.kernels.compiled import compiled as compiled_fn
from torchslim.kernels.compiled import kernel_bias

__all__ = ["VERSION", "GemvPack", "bind", "gemv", "prepack", "stack", "unsupported_reason"]

# Bump when the kernel or how it is called changes: cached timings (torchslim.quantize.runtime) of older kernels
# then no longer apply.
VERSION = 4


@dataclasses.dataclass
class GemvPack:
    """The derived, kernel-ready form of one layer's codes (not saved; rebuilt from the packed buffers).

    Attributes:
        codes: ``(N, K)`` uint8 (per-channel scales) or ``(N, G, group)`` uint8 (grouped scales), one byte per
            code whatever the bit width: nibble-packed 4-bit codes halve the bytes read but their unpacking cost
            more than it saved (SmolLM2-135M shapes, 2 threads, vs fp32: 576x576 1.85x nibbles vs 2.57x bytes,
            1536x576 3.24x vs 3.80x, 49152x576 5.20x vs 7.42x; one scratch run during development, script not
            kept).
        scale: ``(N, 1)`` or ``(N, G)`` float32.
        scale_zero: ``scale * zero_point``, same shape (float32).
        in_features: K (the input length).
        kind: ``"channel"``, ``"group"`` (K a whole number of groups, or one padded group) or ``"group-tail"``
            (the whole groups in ``codes``, the last, shorter group in ``tail``).
        tail: ``"group-tail"``: the last group's ``(codes (N, T), scale (N, 1), scale_zero (N, 1))``; kept apart
            instead of padding x to whole groups on every call: a 576-input layer in groups of 128 ran 1.2-1.3x
            faster that way at 576 and 1536 outputs and the same at 4096-49152 (one scratch run).
    """

    codes: Tensor
    scale: Tensor
    scale_zero: Tensor
    in_features: int
    kind: str
    tail: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Resident bytes of the derived tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.scale_zero, *(self.tail or ())))


def unsupported_reason(layer: Any) -> str | None:
    """Why ``layer`` cannot use :func:`gemv` (None: it can).

    Args:
        layer: an ``IntQuantLayer`` (duck-typed: ``op``, ``bits``, ``granularity``, ``group_size``).
    """
    if getattr(layer, "op", None) != "linear":
        return f"op {getattr(layer, 'op', '?')}: the integer GEMV covers Linear layers only"
    if not 1 <= int(getattr(layer, "bits", 0)) <= 8:
        return f"{getattr(layer, 'bits', '?')}-bit codes: the integer GEMV takes 1-8 bits"
    return None


def prepack(layer: Any) -> GemvPack:
    """Derive the kernel's codes and scales from an ``IntQuantLayer``'s packed buffers.

    Args:
        layer: an ``IntQuantLayer`` accepted by :func:`unsupported_reason`.

    Returns:
        The :class:`GemvPack` on the layer's device.
    """
    codes = layer.codes()  # (rows, groups, group_len) uint8 true codes, padding included
    out_features, in_features = layer.weight_shape
    scale = layer.scale.to(torch.float32)
    zero = layer.zero_points().to(torch.float32)
    if layer.granularity == "tensor":  # one scale for every row
        codes = codes.reshape(out_features, 1, in_features)
        scale, zero = scale.expand(out_features, 1), zero.expand(out_features, 1)
    scale, scale_zero = scale.contiguous(), (scale * zero).contiguous()
    groups, group_len = codes.shape[1:]
    if groups == 1:
        return GemvPack(codes.reshape(out_features, -1)[:, :in_features].contiguous(), scale, scale_zero,
                        in_features, "channel")
    whole = in_features // group_len
    if whole == 0 or whole == groups:
        return GemvPack(codes.contiguous(), scale, scale_zero, in_features, "group")
    rest = in_features - whole * group_len
    tail = (codes[:, whole, :rest].contiguous(), scale[:, whole:].contiguous(), scale_zero[:, whole:].contiguous())
    return GemvPack(codes[:, :whole].contiguous(), scale[:, :whole].contiguous(), scale_zero[:, :whole].contiguous(),
                    in_features, "group-tail", tail)


def stack(packs: list[GemvPack]) -> GemvPack:
    """One pack whose rows are those of ``packs`` in turn: layers that read the same input run as one GEMV.

    Args:
        packs: from :func:`prepack`, of one kind, input length and group shape.

    Returns:
        The stacked :class:`GemvPack` (new tensors; its output is the packs' outputs concatenated).

    Raises:
        ValueError: packs of different kinds, input lengths or group shapes.
    """
    first = packs[0]
    shapes = {(p.kind, p.in_features, tuple(p.codes.shape[1:]), None if p.tail is None else p.tail[0].shape[1])
              for p in packs}
    if len(shapes) != 1:
        raise ValueError(f"packs of different layouts cannot be stacked: {sorted(map(str, shapes))}")
    tails = zip(*(p.tail for p in packs), strict=True) if first.tail is not None else None
    tail = None if tails is None else tuple(torch.cat(parts) for parts in tails)
    return GemvPack(torch.cat([p.codes for p in packs]), torch.cat([p.scale for p in packs]),
                    torch.cat([p.scale_zero for p in packs]), first.in_features, first.kind, tail)


def _channel(x: Tensor, codes: Tensor, scale: Tensor, scale_zero: Tensor, bias: Tensor) -> Tensor:
    acc = (x.unsqueeze(-2) * codes.to(torch.float32)).sum(-1)
    return acc * scale[:, 0] - x.sum(-1, keepdim=True) * scale_zero[:, 0] + bias


# The grouped kernel takes x already padded to whole groups: a pad inside the compiled graph becomes a masked
# load of every element (int64 index compares), which made the kernel several times slower. The zero point is
# subtracted inside the reduction (one graph, no separate matmul for the zero-point term).
def _group(x: Tensor, codes: Tensor, scale: Tensor, scale_zero: Tensor, bias: Tensor) -> Tensor:
    rows, groups, group_len = codes.shape
    xg = x.reshape(x.shape[0], 1, groups, group_len)
    weight = codes.to(torch.float32) * scale.unsqueeze(-1) - scale_zero.unsqueeze(-1)
    return (xg * weight).sum((-1, -2)) + bias


def _group_tail(x: Tensor, codes: Tensor, scale: Tensor, scale_zero: Tensor, tail_codes: Tensor, tail_scale: Tensor,
                tail_scale_zero: Tensor, bias: Tensor) -> Tensor:
    whole = codes.shape[1] * codes.shape[2]
    rest = x[:, whole:].unsqueeze(1) * (tail_codes.to(torch.float32) * tail_scale - tail_scale_zero)
    return _group(x[:, :whole], codes, scale, scale_zero, bias) + rest.sum(-1)


_EAGER = {"channel": _channel, "group": _group, "group-tail": _group_tail}


def bind(pack: GemvPack, bias: Tensor | None = None, *, compiled: bool = True) -> Callable[[Tensor], Tensor]:
    """The function ``x -> x @ W^T + bias`` for the integer weight held by ``pack``, ready for repeated calls.

    Everything that does not depend on ``x`` is settled once here (the hot path of an LLM decode step makes ~200
    calls, where per-call bookkeeping cost as much as the kernel): the compiled kernel is looked up once per
    number of input rows.

    Args:
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias (read at each call, so in-place changes show).
        compiled: run the inductor-compiled kernel (False: the same formula in eager PyTorch, for tests).

    Returns:
        A function of a ``(..., K)`` float input (computed in float32, returned in the input's dtype) giving
        ``(..., N)``.
    """
    kernel, name = _EAGER[pack.kind], f"gemv-{pack.kind}"
    weights = (pack.codes, pack.scale, pack.scale_zero, *(pack.tail or ()))
    in_features = pack.in_features
    padded = pack.codes.shape[1] * pack.codes.shape[2] if pack.kind == "group" else in_features
    zeros = pack.scale.new_zeros(pack.scale.shape[0])
    by_rows: dict[int, Callable[..., Tensor]] = {}

    def run(x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return run(x.to(torch.float32)).to(x.dtype)
        lead = x.shape[:-1]
        flat = x.reshape(-1, in_features)
        if padded != in_features:
            flat = F.pad(flat, (0, padded - in_features))
        elif not flat.is_contiguous():  # the compiled kernel assumes contiguous rows (it skips stride checks)
            flat = flat.contiguous()
        b = kernel_bias(bias, zeros)
        fn = by_rows.get(flat.shape[0])
        if fn is None:
            fn = by_rows[flat.shape[0]] = compiled_fn(name, kernel, (flat, *weights, b)) if compiled else kernel
        return fn(flat, *weights, b).reshape(*lead, -1)

    return run


def gemv(x: Tensor, pack: GemvPack, bias: Tensor | None = None, *, compiled: bool = True) -> Tensor:
    """``x @ W^T + bias`` for the integer weight held by ``pack`` (one call of :func:`bind`).

    Args:
        x: ``(..., K)`` float input (computed in float32, returned in ``x``'s dtype).
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias.
        compiled: run the inductor-compiled kernel (False: the same formula in eager PyTorch, for tests).

    Returns:
        ``(..., N)``.
    """
    return bind(pack, bias, compiled=compiled)(x)

"""Int8 x int8 matrix products for inputs of several rows on CPU (W8A8), compiled by inductor.

A linear layer with codes ``q`` (<= 8 bits, one scale ``s`` and zero point ``z`` per output row) computes
``y = x @ ((q - z) * s)^T + b``. Here each input row is quantized at run time to int8 with its own scale
(``x ~= a * xq``, ``a = max|x_row| / 127``) and the codes are shifted into int8 (``c = q - 128``,
``z' = z - 128``), so that ``y[m, n] = a[m] * s[n] * (xq[m] . c[n] - z'[n] * sum(xq[m])) + b[n]``: exact in the
codes, with the activations' rounding as the only error (cosine >= 0.9999 vs the weight-only model on random
layers). ``torch._int_mm`` (int8 GEMM, int32 sums) does the products; inductor fuses the row quantization and the
epilogue around it. On the development machine (AVX2, 2 threads) a 1536 x 384 layer ran 3.5-3.8x faster than
fp32 ``F.linear`` at 32-4096 rows (one scratch run); at one row the GEMV of :mod:`cpu_gemv` is the faster path.
The kernel is compiled per number of input rows (1-2 s each on 2 cores, kept for the process): a server whose
batch x sequence sizes vary pays that once per new size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchslim.kernels.compiled import compiled, kernel_bias

__all__ = ["Int8Pack", "bind", "linear", "prepack", "unsupported_reason"]


@dataclasses.dataclass
class Int8Pack:
    """The int8 form of one layer's codes (derived at run time, never saved).

    Attributes:
        codes_t: ``(K, N)`` int8, the codes minus 128, transposed for ``torch._int_mm``.
        scale: ``(N,)`` float32.
        zero: ``(N,)`` float32, the zero points minus 128.
    """

    codes_t: Tensor
    scale: Tensor
    zero: Tensor

    @property
    def nbytes(self) -> int:
        """Resident bytes of the derived tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes_t, self.scale, self.zero))


def unsupported_reason(layer: Any) -> str | None:
    """Why ``layer`` cannot use :func:`linear` (None: it can).

    Args:
        layer: an ``IntQuantLayer`` (duck-typed: ``op``, ``bits``, ``granularity``).
    """
    if getattr(layer, "op", None) != "linear":
        return f"op {getattr(layer, 'op', '?')}: int8 x int8 products cover Linear layers only"
    if not hasattr(layer, "codes") or not 1 <= int(getattr(layer, "bits", 0)) <= 8:
        return "int8 x int8 products need integer codes of 1-8 bits"
    if getattr(layer, "granularity", None) not in ("channel", "tensor"):
        return f"{layer.granularity} scales: int8 x int8 products need one scale per output row"
    return None


def prepack(layer: Any) -> Int8Pack:
    """Derive the int8 codes, scales and zero points from an ``IntQuantLayer`` accepted by
    :func:`unsupported_reason`."""
    out_features, in_features = layer.weight_shape
    codes = layer.codes()  # (rows, groups, group_len) true codes; one row for a per-tensor scale
    codes = codes.reshape(-1)[: out_features * in_features] if layer.granularity == "tensor" else (
        codes.reshape(out_features, -1)[:, :in_features])
    codes = codes.reshape(out_features, in_features)
    shifted = (codes.to(torch.int16) - 128).to(torch.int8)
    scale = layer.scale.to(torch.float32).reshape(-1).expand(out_features)
    zero = layer.zero_points().to(torch.float32).reshape(-1).expand(out_features) - 128
    return Int8Pack(shifted.t().contiguous(), scale.contiguous(), zero.contiguous())


def _w8a8(x: Tensor, codes_t: Tensor, scale: Tensor, zero: Tensor, bias: Tensor) -> Tensor:
    row_scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    xq = torch.round(x / row_scale).to(torch.int8)
    acc = torch._int_mm(xq, codes_t).to(torch.float32)
    acc = acc - zero * xq.to(torch.float32).sum(-1, keepdim=True)
    return acc * (row_scale * scale) + bias


def bind(pack: Int8Pack, bias: Tensor | None = None, *, compiled_kernel: bool = True) -> Callable[[Tensor], Tensor]:
    """The function ``x -> x @ W^T + bias`` with ``x`` quantized per row to int8 (see the module docstring).

    Args:
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias (read at each call).
        compiled_kernel: run the inductor-compiled kernel (False: the same formula in eager PyTorch, for tests).

    Returns:
        A function of a ``(..., K)`` float input (computed in float32, returned in its dtype) giving ``(..., N)``;
        the compiled kernel is looked up once per number of input rows.
    """
    weights = (pack.codes_t, pack.scale, pack.zero)
    zeros = pack.scale.new_zeros(pack.scale.shape[0])
    by_rows: dict[int, Callable[..., Tensor]] = {}

    def run(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()  # the compiled kernel skips stride checks
        b = kernel_bias(bias, zeros)
        fn = by_rows.get(flat.shape[0])
        if fn is None:
            fn = by_rows[flat.shape[0]] = compiled("int8mm", _w8a8, (flat, *weights, b)) if compiled_kernel else _w8a8
        return fn(flat, *weights, b).reshape(*lead, -1).to(x.dtype)

    return run


def linear(x: Tensor, pack: Int8Pack, bias: Tensor | None = None, *, compiled_kernel: bool = True) -> Tensor:
    """``x @ W^T + bias`` with ``x`` quantized per row to int8 (one call of :func:`bind`).

    Args:
        x: ``(..., K)`` float input (computed in float32, returned in ``x``'s dtype).
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias.
        compiled_kernel: run the inductor-compiled kernel (False: the same formula in eager PyTorch, for tests).

    Returns:
        ``(..., N)``.
    """
    return bind(pack, bias, compiled_kernel=compiled_kernel)(x)

"""Integer-weight matrix-vector products on CPU.

A linear layer with k-bit codes ``q`` (k <= 8), scales ``s`` and zero points ``z`` computes
``y = x @ ((q - z) * s)^T``. With the zero point folded out exactly,
``y[n] = sum_g s[n, g] * (x_g . q[n, g]) - sum_g s[n, g] * z[n, g] * sum(x_g)``, the inner products read at most
one byte per weight: at batch 1 a weight read from memory costs 1/8-1/4 of an fp32 weight, so the product is faster
than ``F.linear`` once the weight no longer sits in the cache. The loop is the C kernel of
:mod:`torchslim.kernels.native`. The codes are derived from a layer's packed buffers at first use (:func:`prepack`)
in one of three layouts; the saved file does not change:

- ``nibble-lanes`` (codes of <= 4 bits, groups of a multiple of 64 inputs or one group a row): four codes per
  16-bit lane, half a byte a weight;
- ``byte-lanes`` (other codes, groups of a multiple of 32 inputs or one group a row): two codes per 16-bit lane;
- ``bytes`` (any other group length): one byte a code, products in float32.

The two lane layouts multiply integer codes by the input rounded to 16 bits per group (step = the group's largest
absolute input / 32767, so each input is off by at most 1/65534 of that): one ``vpmaddwd`` multiplies 16 codes
where the float loop widened 8 codes to floats, and int4 reads half the bytes. Outputs differed from the float
product by 2e-5 to 7e-5 of their largest value on the test layers (a scratch check; tests bound it at 1e-4), far
below the weights' own rounding.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchslim.kernels import native
from torchslim.kernels.compiled import kernel_bias

__all__ = ["LAYOUTS", "VERSION", "GemvPack", "bind", "gemv", "prepack", "reference_weight", "stack",
           "unsupported_reason"]

# Bump when the kernel or how it is called changes: cached timings (torchslim.quantize.runtime) of older kernels
# then no longer apply.
VERSION = 7

LAYOUTS = ("bytes", "nibble-lanes", "byte-lanes")  # the kernel's layout numbers 0, 1, 2
_LANE_CODES = {"nibble-lanes": (64, 4), "byte-lanes": (32, 8)}  # codes per block of 16 lanes, bits per code
_PARALLEL_WEIGHTS = 1 << 17  # layers with fewer weights run single-threaded (a chosen bound, not tuned: see bind)


@dataclasses.dataclass
class GemvPack:
    """The derived, kernel-ready form of one layer's codes (not saved; rebuilt from the packed buffers).

    Attributes:
        codes: ``(N, row_bytes)`` uint8, row-major, in ``layout``: ``bytes`` holds ``G * group_len`` codes a row;
            the lane layouts hold each group's codes in blocks of 16 little-endian 16-bit lanes (a group's last
            block zero-padded). Codes past ``in_features`` are multiplied by zero inputs.
        scale: ``(N, G)`` float32 (``G = 1``: one scale per output row).
        scale_zero: ``scale * zero_point``, same shape (float32).
        in_features: K (the input length).
        group_len: inputs per scale; the last group may be shorter (``K`` not a whole number of groups).
        layout: one of :data:`LAYOUTS`.
    """

    codes: Tensor
    scale: Tensor
    scale_zero: Tensor
    in_features: int
    group_len: int
    layout: str = "bytes"

    @property
    def nbytes(self) -> int:
        """Resident bytes of the derived tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.scale_zero))


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
        codes = codes.reshape(out_features, 1, -1)
        scale, zero = scale.expand(out_features, 1), zero.expand(out_features, 1)
    groups, group_len = codes.shape[1:]
    layout = _layout(int(layer.bits), groups, group_len)
    if layout == "bytes":
        stored = codes.reshape(out_features, groups * group_len).contiguous()
    else:
        stored = _to_lanes(codes, *_LANE_CODES[layout])
    return GemvPack(stored, scale.reshape(out_features, groups).contiguous(),
                    (scale * zero).reshape(out_features, groups).contiguous(), in_features, group_len, layout)


def _layout(bits: int, groups: int, group_len: int) -> str:
    if bits <= 4 and (groups == 1 or group_len % 64 == 0):
        return "nibble-lanes"
    if groups == 1 or group_len % 32 == 0:
        return "byte-lanes"
    return "bytes"


def _to_lanes(codes: Tensor, per_block: int, bits: int) -> Tensor:
    """``(N, G, L)`` codes -> ``(N, G * blocks * 32)`` bytes: lane ``l`` of a block holds its codes ``l + 16 j``."""
    rows, groups, length = codes.shape
    blocks = -(-length // per_block)
    padded = torch.zeros(rows, groups, blocks * per_block, dtype=torch.int32, device=codes.device)
    padded[..., :length] = codes
    parts = padded.reshape(rows, groups, blocks, per_block // 16, 16)
    lanes = sum(parts[..., j, :] << (bits * j) for j in range(per_block // 16))
    pairs = torch.stack([lanes & 255, lanes >> 8], dim=-1).to(torch.uint8)  # little-endian 16-bit lanes
    return pairs.reshape(rows, groups * blocks * 32)


def _from_lanes(stored: Tensor, groups: int, per_block: int, bits: int) -> Tensor:
    """The inverse of :func:`_to_lanes`: ``(N, G, blocks * per_block)`` codes (int32)."""
    pairs = stored.to(torch.int32).reshape(stored.shape[0], groups, -1, 16, 2)
    lanes = pairs[..., 0] | (pairs[..., 1] << 8)
    parts = [(lanes >> (bits * j)) & ((1 << bits) - 1) for j in range(per_block // 16)]
    return torch.stack(parts, dim=-2).reshape(stored.shape[0], groups, -1)


def stack(packs: list[GemvPack]) -> GemvPack:
    """One pack whose rows are those of ``packs`` in turn: layers that read the same input run as one GEMV.

    Args:
        packs: from :func:`prepack`, of one input length and group shape.

    Returns:
        The stacked :class:`GemvPack` (new tensors; its output is the packs' outputs concatenated).

    Raises:
        ValueError: packs of different input lengths or group shapes.
    """
    first = packs[0]
    shapes = {(p.in_features, p.group_len, p.codes.shape[1], p.scale.shape[1], p.layout) for p in packs}
    if len(shapes) != 1:
        raise ValueError(f"packs of different layouts cannot be stacked: {sorted(map(str, shapes))}")
    return GemvPack(torch.cat([p.codes for p in packs]), torch.cat([p.scale for p in packs]),
                    torch.cat([p.scale_zero for p in packs]), first.in_features, first.group_len, first.layout)


def reference_weight(pack: GemvPack) -> Tensor:
    """The ``(N, K)`` float32 weight ``pack`` computes with (for tests and the eager formula)."""
    rows, groups = pack.scale.shape
    if pack.layout == "bytes":
        codes = pack.codes.reshape(rows, groups, -1)
    else:
        codes = _from_lanes(pack.codes, groups, *_LANE_CODES[pack.layout])
    weight = codes[..., : pack.group_len].to(torch.float32) * pack.scale.unsqueeze(-1) - pack.scale_zero.unsqueeze(-1)
    return weight.reshape(rows, -1)[:, : pack.in_features]


def bind(pack: GemvPack, bias: Tensor | None = None, *, compiled: bool = True) -> Callable[[Tensor], Tensor]:
    """The function ``x -> x @ W^T + bias`` for the integer weight held by ``pack``, ready for repeated calls.

    Everything that does not depend on ``x`` is settled once here (the hot path of an LLM decode step makes ~200
    calls, where per-call bookkeeping cost as much as the kernel).

    Args:
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias (read at each call, so in-place changes show).
        compiled: run the native kernel (False: the same product in eager PyTorch, for tests).

    Returns:
        A function of a ``(..., K)`` float input (computed in float32, returned in the input's dtype) giving
        ``(..., N)``.

    Raises:
        MissingDependencyError: ``compiled`` and the native kernel cannot be built (no C compiler).
    """
    in_features = pack.in_features
    rows, groups = pack.scale.shape
    zeros = pack.scale.new_zeros(rows)
    if not compiled:
        def eager(x: Tensor) -> Tensor:
            flat = x.reshape(-1, in_features).to(torch.float32)
            out = flat @ reference_weight(pack).T + kernel_bias(bias, zeros)
            return out.reshape(*x.shape[:-1], rows).to(x.dtype)

        return eager
    kernel = native.gemv_library().gemv_u8_layer
    layout = LAYOUTS.index(pack.layout)
    row_units = pack.codes.shape[1] // (1 if layout == 0 else 2)  # bytes or 16-bit lanes a row
    constants = native.GemvLayer(pack.codes.data_ptr(), rows, row_units, pack.scale.data_ptr(),
                                 pack.scale_zero.data_ptr(), groups, pack.group_len, in_features, layout)
    layer = ctypes.c_void_p(ctypes.addressof(constants))
    # an OpenMP team costs a few microseconds per call: small layers run on the calling thread alone
    parallel = rows * in_features >= _PARALLEL_WEIGHTS
    # a float32 bias is read through its pointer (in-place changes show); another dtype is converted per call
    fixed_bias = (ctypes.c_void_p(bias.data_ptr()) if bias is not None and bias.dtype == torch.float32
                  and bias.is_contiguous() else None)
    pointer, count = ctypes.c_void_p, ctypes.c_int64

    def run(x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return run(x.to(torch.float32)).to(x.dtype)
        if x.shape[-1] != in_features:
            raise ValueError(f"input of {x.shape[-1]} features: expected {in_features}")
        if not x.is_contiguous():
            x = x.contiguous()
        # torch.empty of int sizes: of a torch.Size it cost ~5 us a call (scratch timeit, 2026-12-03)
        dims = x.dim()
        out = (torch.empty(x.shape[0], rows) if dims == 2 else torch.empty(x.shape[0], x.shape[1], rows) if dims == 3
               else torch.empty((*x.shape[:-1], rows)))
        b = fixed_bias if fixed_bias is not None or bias is None else pointer(
            kernel_bias(bias, zeros).contiguous().data_ptr())
        kernel(layer, pointer(x.data_ptr()), count(x.numel() // in_features), b, pointer(out.data_ptr()),
               torch.get_num_threads() if parallel else 1)
        return out

    run.keep = (pack, constants, bias)  # the memory behind the kernel's pointers lives as long as the closure
    return run


def gemv(x: Tensor, pack: GemvPack, bias: Tensor | None = None, *, compiled: bool = True) -> Tensor:
    """``x @ W^T + bias`` for the integer weight held by ``pack`` (one call of :func:`bind`).

    Args:
        x: ``(..., K)`` float input (computed in float32, returned in ``x``'s dtype).
        pack: from :func:`prepack`.
        bias: optional ``(N,)`` bias.
        compiled: run the native kernel (False: the same product in eager PyTorch, for tests).

    Returns:
        ``(..., N)``.
    """
    return bind(pack, bias, compiled=compiled)(x)

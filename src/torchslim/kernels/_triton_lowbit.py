"""Triton kernels for ``y = x @ dequant(W).T`` on ``IntQuantLayer``'s packed format (imports triton).

Only :mod:`torchslim.kernels.lowbit` imports this module, lazily. The kernel body is a plain
function decorated twice on demand: ``triton.jit`` for GPUs and the interpreter's
``InterpretedFunction`` for CPU tests, so the choice does not depend on whether ``TRITON_INTERPRET``
was set before triton was first imported.

Stored format (see ``IntQuantLayer``): element ``(n, k)`` of the weight is element ``n*row_elems + k``
of a little-endian bit stream of ``s = (q - z) mod 2**bits``; the weight is ``(q - z) * scale`` with
``q = (s + z) mod 2**bits``. Each K-tile lies inside one scale group, so the kernel accumulates
``sum_k x_k * (q_k - z)`` exactly in fp32 and multiplies by the group's scale once per tile. Codes
become floats without the slow int->float conversion: ``(s + z + M) & (mask | M)`` with
``M = 0x4B000000`` is the fp32 bit pattern of ``2**23 + q``, and subtracting ``2**23 + z`` is exact.
No dequantized copy of W is ever written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_combine(a, b):
    return a + b


# Row sums use tl.reduce with triton's own sum combine rather than tl.sum (and tl.full, not tl.zeros):
# those are @jit library functions, which the interpreter cannot call unless TRITON_INTERPRET was set
# before triton was imported; the interpreter recognises this combine and reduces with numpy.
_SUM = getattr(tl.standard, "_sum_combine", None) or _add_combine


# Triton passes pointers and strides as arguments and specialises the kernel on its tl.constexpr parameters, so
# the long list is the kernel's interface; its body is left whole (splitting it needs a GPU run to re-time it).
def _lowbit_matmul_kernel(  # noqa: C901, PLR0913, PLR0915 - Triton: pointers, strides and constexpr specialisations
    x_ptr,
    w_ptr,
    scale_ptr,
    zp_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_os,
    row_elems,
    row_bytes,
    group_size,
    scale_stride_n,
    scale_stride_g,
    zp_stride_n,
    zp_stride_g,
    tiles_per_split,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    NIBBLE_PAIRS: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LANES_K: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) output tile over one split of K.

    ``NIBBLE_PAIRS`` (4-bit rows starting on a byte): a tile loads ``BLOCK_K // 2`` contiguous bytes
    per row and splits them into the even (low nibble) and odd (high nibble) elements, which meet the
    matching even/odd activations. Otherwise each element's byte is addressed on its own (8-bit:
    contiguous bytes; 4-bit rows that start mid-byte: per-element nibble shifts). ``LANES_K`` is the
    number of elements per tile row in one half (``BLOCK_K // 2`` or ``BLOCK_K``). ``USE_DOT`` picks
    tensor-core ``tl.dot`` (tiled path, BLOCK_M >= 16) or broadcast multiplies accumulated per lane and
    summed once at the end (GEMV). ``EVEN_K`` (K is a multiple of BLOCK_K) drops the K masks so the
    packed bytes load as wide vectors. Split ``program_id(1)`` covers ``tiles_per_split`` K-tiles.
    ``DOT_FP32`` feeds tl.dot fp32 operands (exact here: integers times upcast activations); only the
    interpreter uses it, as its tl.dot multiplies bfloat16 bit patterns as integers (triton 3.9).
    ``PARTIAL`` stores fp32 partial sums of split ``program_id(1)`` (reduced by ``_splitk_reduce``);
    otherwise the bias is added and the tile is stored in the output's dtype.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, LANES_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    code_mask = (1 << BITS) - 1
    keep = code_mask | 0x4B000000
    flip = (1 << (BITS - 1)) | 0x4B000000

    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if NIBBLE_PAIRS:
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * row_bytes
    else:
        elem_rows = offs_n.to(tl.int64)[:, None] * row_elems
    if SYMMETRIC:
        zc = 8388608.0 + (1 << (BITS - 1))
    if USE_DOT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:  # GEMV: products accumulate per lane; one cross-lane sum after the loop
        if BLOCK_M == 1:
            acc2 = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        else:
            acc3 = tl.full((BLOCK_M, BLOCK_N, LANES_K), 0.0, tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        g = k0 // group_size
        s = tl.load(scale_ptr + offs_n * scale_stride_n + g * scale_stride_g, mask=n_mask, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            zi = offs_n * zp_stride_n + g * zp_stride_g
            if BITS == 8:
                z = tl.load(zp_ptr + zi, mask=n_mask, other=0).to(tl.int32)
            else:
                zbyte = tl.load(zp_ptr + (zi >> 1), mask=n_mask, other=0).to(tl.int32)
                z = (zbyte >> ((zi & 1) * 4)) & code_mask
            zm = (z + 0x4B000000)[:, None]
            zc = (z + 8388608).to(tl.float32)[:, None]
        if NIBBLE_PAIRS:
            kk = k0 + 2 * offs_j
            w_tile = w_rows + (t * LANES_K + offs_j)[None, :]
            if EVEN_K:
                b = tl.load(w_tile, mask=n_mask[:, None], other=0).to(tl.int32)
                x_even = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
                x_odd = tl.load(x_rows + (kk + 1)[None, :], mask=m_mask[:, None], other=0.0)
            else:
                b = tl.load(w_tile, mask=n_mask[:, None] & (kk < K)[None, :], other=0).to(tl.int32)
                x_even = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
                x_odd = tl.load(x_rows + (kk + 1)[None, :], mask=m_mask[:, None] & (kk + 1 < K)[None, :], other=0.0)
            if SYMMETRIC:  # (s + 2**(bits-1)) mod 2**bits flips the top code bit: one bitwise op
                lo = ((b & code_mask) ^ flip).to(tl.float32, bitcast=True) - zc
                hi = (((b >> 4) & code_mask) ^ flip).to(tl.float32, bitcast=True) - zc
            else:
                lo = ((b + zm) & keep).to(tl.float32, bitcast=True) - zc
                hi = (((b >> 4) + zm) & keep).to(tl.float32, bitcast=True) - zc
            if USE_DOT:
                if DOT_FP32:
                    x_even = x_even.to(tl.float32)
                    x_odd = x_odd.to(tl.float32)
                part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)))
                part += tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)))
                acc += part * s[None, :]
            elif BLOCK_M == 1:  # one row: 2-D products, weights back in element order (lo, hi per byte)
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * LANES_K))
                kx = k0 + tl.arange(0, 2 * LANES_K)
                if EVEN_K:
                    xt = tl.load(x_ptr + kx)
                else:
                    xt = tl.load(x_ptr + kx, mask=kx < K, other=0.0)
                acc2 += xt.to(tl.float32)[None, :] * w * s[:, None]
            else:
                prod = x_even.to(tl.float32)[:, None, :] * lo[None, :, :]
                prod += x_odd.to(tl.float32)[:, None, :] * hi[None, :, :]
                acc3 += prod * s[None, :, None]
        else:
            kk = k0 + offs_j
            e = elem_rows + kk[None, :]
            if EVEN_K:
                w_mask = n_mask[:, None]
                x_mask = m_mask[:, None]
            else:
                w_mask = n_mask[:, None] & (kk < K)[None, :]
                x_mask = m_mask[:, None] & (kk < K)[None, :]
            if BITS == 8:
                code = tl.load(w_ptr + e, mask=w_mask, other=0).to(tl.int32)
            else:  # 4-bit rows that start mid-byte: each element picks its nibble
                code = tl.load(w_ptr + (e >> 1), mask=w_mask, other=0).to(tl.int32)
                code = code >> ((e & 1) * 4).to(tl.int32)
            if SYMMETRIC:
                v = ((code & code_mask) ^ flip).to(tl.float32, bitcast=True) - zc
            else:
                v = ((code + zm) & keep).to(tl.float32, bitcast=True) - zc
            xt = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
            if USE_DOT:
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                acc += tl.dot(xt, tl.trans(v.to(xt.dtype))) * s[None, :]
            elif BLOCK_M == 1:
                acc2 += xt.to(tl.float32) * v * s[:, None]
            else:
                acc3 += (xt.to(tl.float32)[:, None, :] * v[None, :, :]) * s[None, :, None]
    if not USE_DOT:
        if BLOCK_M == 1:
            acc = tl.reshape(tl.reduce(acc2, 1, _SUM), (1, BLOCK_N))
        else:
            acc = tl.reduce(acc3, 2, _SUM)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """``out = sum_s part[s] (+ bias)`` over a flat (M*N) output, in a fixed order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict[bool, tuple] = {}


def kernels(interpret: bool) -> tuple:
    """``(matmul, reduce)`` kernels, compiled (``interpret=False``) or run by Triton's CPU interpreter."""
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            wrap = InterpretedFunction
        else:
            wrap = triton.jit
        _KERNELS[interpret] = (wrap(_lowbit_matmul_kernel), wrap(_splitk_reduce_kernel))
    return _KERNELS[interpret]

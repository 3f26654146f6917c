"""GPU matmul on ``IntQuantLayer``'s packed weights: ``y = x @ dequant(W).T + b`` with Triton.

``IntQuantLayer.forward`` calls :func:`lowbit_linear` for CUDA inputs when :func:`dispatch_reason`
finds nothing against it; the weights stay in their stored, packed form (no re-layout, no
dequantized copy). Batches (rows of ``x``) of at most 4 take a GEMV path (vector multiply and row
sums, split over K); larger ones a tiled ``tl.dot`` path, also split over K when N alone gives too few
programs. Block sizes are tuned once per (N, K, batch bucket, format) by timing candidates with
``triton.testing.do_bench`` (``TORCHSLIM_KERNEL_TUNE=0`` uses a heuristic instead). With
``interpret=True`` the same kernel runs on CPU tensors in Triton's interpreter (the tests use this).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import torch

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, MissingDependencyError

TUNE_ENV = "TORCHSLIM_KERNEL_TUNE"
DISABLE_ENV = "TORCHSLIM_DISABLE_KERNELS"
GEMV_MAX_ROWS = 4
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
_NO_GROUP = 1 << 30  # "group size" of channel/tensor scales: every tile is in group 0


@register_config("lowbit_kernel")
@dataclasses.dataclass(frozen=True)
class KernelConfig(Config):
    """Launch parameters of the low-bit matmul kernel.

    Args:
        block_m: rows of ``x`` per program (GEMV: the batch rounded up to a power of two).
        block_n: output features per program.
        block_k: input features per loop step (a power of two; divides the group size).
        split_k: programs sharing one output tile, each over a slice of K (fp32 partials, then a
            deterministic reduction).
        num_warps: warps per program.
        num_stages: software-pipelining depth (GPU only).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> None:
        for name, low, high in (("block_m", 1, 128), ("block_n", 16, 256), ("block_k", 2, 512)):
            self.check_int(name, low, high)
            value = getattr(self, name)
            if value & (value - 1):
                raise self.fail(name, value, f"a power of two in [{low}, {high}]")
        self.check_int("split_k", 1, 64)
        self.check_choice("num_warps", (1, 2, 4, 8, 16))
        self.check_int("num_stages", 1, 8)


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> Any:
    """Import and return ``triton``.

    Raises:
        MissingDependencyError: when it is not installed (the message names the extra to install).
    """
    try:
        import triton
    except ImportError as exc:
        raise MissingDependencyError(
            "triton is needed for the GPU low-bit kernels but is not installed: pip install 'torchslim[gpu]'"
        ) from exc
    return triton


def unsupported_reason(layer: Any) -> str | None:
    """Why the kernel cannot run ``layer`` (``None`` when it can).

    Args:
        layer: an ``IntQuantLayer``.

    Returns:
        A sentence naming the unsupported property, or ``None``.
    """
    if getattr(layer, "op", None) != "linear":
        return f"op = {getattr(layer, 'op', type(layer).__name__)!r}: only linear layers have a kernel"
    if layer.bits not in (4, 8):
        return f"bits = {layer.bits}: the kernel supports 4 and 8"
    if layer.granularity == "group" and layer.group_size % 32:
        return f"group_size = {layer.group_size}: the kernel needs a multiple of 32"
    return None


def dispatch_reason(layer: Any, x: torch.Tensor) -> str | None:
    """Why ``layer(x)`` keeps the PyTorch path (``None`` when the kernel runs).

    The kernel runs for fp16/bf16 CUDA inputs when triton is installed, the layer is supported and
    ``TORCHSLIM_DISABLE_KERNELS`` is unset (or ``0``).
    """
    if not x.is_cuda:
        return "input is not on CUDA"
    if x.dtype not in ACTIVATION_DTYPES:
        return f"input dtype {x.dtype}: the kernel takes float16 or bfloat16"
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    if not triton_available():
        return "triton is not installed"
    return unsupported_reason(layer)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the kernel finds element (n, k), its scale and its zero point (ints only; no tensors)."""

    n: int
    k: int
    bits: int
    symmetric: bool
    row_elems: int
    group_size: int
    scale_strides: tuple[int, int]
    zp_strides: tuple[int, int]
    nibble_pairs: bool
    k_limit: int  # block_k must divide this (group size) or is free (channel/tensor)

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.bits // 8 if self.nibble_pairs or self.bits == 8 else 0


def _layout(layer: Any) -> _Layout:
    n, k = (int(d) for d in layer.weight_shape)
    if layer.granularity == "group":
        groups = -(-k // layer.group_size)
        row_elems, group_size, scale_strides, limit = groups * layer.group_size, layer.group_size, (groups, 1), None
    elif layer.granularity == "channel":
        row_elems, group_size, scale_strides, limit = k, _NO_GROUP, (1, 0), None
    else:  # tensor: one scale, the stream is the row-major weight
        row_elems, group_size, scale_strides, limit = k, _NO_GROUP, (0, 0), None
    return _Layout(
        n=n,
        k=k,
        bits=layer.bits,
        symmetric=bool(layer.symmetric),
        row_elems=row_elems,
        group_size=group_size,
        scale_strides=scale_strides,
        zp_strides=scale_strides,  # zero points are packed codes in the same (rows, groups) order
        nibble_pairs=layer.bits == 4 and row_elems % 2 == 0,
        k_limit=layer.group_size if layer.granularity == "group" else (limit or 0),
    )


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _fit_block_k(block_k: int, layout: _Layout, use_dot: bool) -> int:
    """Largest power of two <= block_k that divides the group size (and keeps tl.dot's K >= 16)."""
    if layout.k_limit:
        while layout.k_limit % block_k:
            block_k //= 2
    lanes_min = 16 if use_dot else 1
    per_lane = 2 if layout.nibble_pairs else 1
    return max(block_k, lanes_min * per_lane)


def default_config(rows: int, layout: _Layout, programs_wanted: int = 264) -> KernelConfig:
    """A heuristic launch configuration (used untuned, and as a tuning candidate).

    Args:
        rows: rows of ``x`` (tokens).
        layout: the layer's layout.
        programs_wanted: programs to aim for (about two per streaming multiprocessor).
    """
    if rows <= GEMV_MAX_ROWS:
        block_m, block_n, block_k = _pow2_at_least(rows), 32, 128
    else:
        block_m, block_n, block_k = min(64, max(16, _pow2_at_least(rows))), 64, 64
    block_k = _fit_block_k(block_k, layout, block_m >= 16)
    return _with_split(KernelConfig(block_m, block_n, block_k), rows, layout, programs_wanted)


def _with_split(config: KernelConfig, rows: int, layout: _Layout, programs_wanted: int) -> KernelConfig:
    tiles = -(-rows // config.block_m) * -(-layout.n // config.block_n)
    k_steps = -(-layout.k // config.block_k)
    split = 1
    while tiles * split < programs_wanted and split * 2 <= min(16, k_steps):
        split *= 2
    return dataclasses.replace(config, split_k=split)


def _candidates(rows: int, layout: _Layout, sms: int) -> list[KernelConfig]:
    """Configurations timed by the tuner for one (shape, batch bucket)."""
    if rows <= GEMV_MAX_ROWS:
        block_m = _pow2_at_least(rows)
        shapes = [
            (16, 128, 2, 2),
            (32, 64, 2, 2),
            (32, 128, 4, 2),
            (32, 256, 4, 2),
            (64, 64, 4, 2),
            (64, 128, 4, 3),
            (64, 128, 8, 2),
            (128, 64, 4, 2),
            (128, 128, 8, 2),
        ]
    else:
        block_m = min(64, max(16, _pow2_at_least(rows)))
        shapes = [
            (32, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (128, 64, 8, 4),
            (64, 32, 4, 4),
            (128, 128, 8, 3),
        ]
    found: dict[KernelConfig, None] = {}
    for block_n, block_k, warps, stages in shapes:
        base = KernelConfig(block_m, block_n, _fit_block_k(block_k, layout, block_m >= 16), 1, warps, stages)
        for wanted in (sms, 2 * sms, 4 * sms):
            found[_with_split(base, rows, layout, wanted)] = None
    return list(found)


_TUNED: dict[tuple, KernelConfig] = {}


def _tune_enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1") not in ("0", "")


def _choose_config(x2d: torch.Tensor, layer: Any, layout: _Layout, out_dtype: torch.dtype) -> KernelConfig:
    rows = x2d.shape[0]
    bucket = _pow2_at_least(rows) if rows <= 64 else 64
    props = torch.cuda.get_device_properties(x2d.device)
    key = (props.name, layout, bucket, x2d.dtype)
    config = _TUNED.get(key)
    if config is not None:
        return config
    sms = props.multi_processor_count
    if not _tune_enabled() or torch.cuda.is_current_stream_capturing():
        return default_config(rows, layout, 2 * sms)
    from triton.testing import do_bench

    timings = {}
    for candidate in _candidates(rows, layout, sms):
        try:
            timings[candidate] = do_bench(lambda c=candidate: _launch(x2d, layer, layout, c, False), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config that does not compile or fit is simply not a candidate
            continue
    config = min(timings, key=timings.get) if timings else default_config(rows, layout, 2 * sms)
    _TUNED[key] = config
    return config


def _launch(x2d: torch.Tensor, layer: Any, layout: _Layout, config: KernelConfig, interpret: bool) -> torch.Tensor:
    from torchslim.kernels._triton_lowbit import kernels

    matmul, reduce = kernels(interpret)
    rows, n = x2d.shape[0], layout.n
    use_dot = config.block_m >= 16
    k_steps = -(-layout.k // config.block_k)
    tiles_per_split = -(-k_steps // max(1, min(config.split_k, k_steps)))
    split = -(-k_steps // tiles_per_split)  # no empty splits
    out = torch.empty((rows, n), dtype=x2d.dtype, device=x2d.device)
    bias = layer.bias if layer.bias is not None else layer.scale  # placeholder pointer when there is no bias
    zero_point = layer.zero_point if not layout.symmetric else layer.packed
    partial = split > 1
    target = torch.empty((split, rows, n), dtype=torch.float32, device=x2d.device) if partial else out
    grid = (-(-n // config.block_n), split, -(-rows // config.block_m))
    matmul[grid](
        x2d, layer.packed, layer.scale, zero_point, bias, target,
        rows, n, layout.k,
        x2d.stride(0), n, rows * n,
        layout.row_elems, layout.row_bytes, layout.group_size,
        layout.scale_strides[0], layout.scale_strides[1], layout.zp_strides[0], layout.zp_strides[1],
        tiles_per_split,
        BITS=layout.bits, SYMMETRIC=layout.symmetric, NIBBLE_PAIRS=layout.nibble_pairs,
        EVEN_K=layout.k % config.block_k == 0,
        HAS_BIAS=layer.bias is not None, PARTIAL=partial, USE_DOT=use_dot,
        DOT_FP32=interpret and x2d.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        LANES_K=config.block_k // 2 if layout.nibble_pairs else config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if partial:
        block = 1024
        reduce[(-(-(rows * n) // block),)](
            target, bias, out, rows * n, n, SPLITS=split, HAS_BIAS=layer.bias is not None, BLOCK=block, num_warps=4
        )
    return out


def _layout_of(layer: Any) -> _Layout:
    cached = layer.__dict__.get("_lowbit_layout")
    if cached is None:
        cached = _layout(layer)
        layer.__dict__["_lowbit_layout"] = cached
    return cached


def _forward(x: torch.Tensor, layer: Any, interpret: bool, config: KernelConfig | None) -> torch.Tensor:
    layout = _layout_of(layer)
    if x.shape[-1] != layout.k:
        raise ConfigError(f"input has {x.shape[-1]} features: expected {layout.k} (the layer's in_features)")
    x2d = x.reshape(-1, layout.k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], layout.n))
    if config is None:
        config = default_config(x2d.shape[0], layout, 8) if interpret else _choose_config(x2d, layer, layout, x.dtype)
    elif config.block_k != _fit_block_k(config.block_k, layout, config.block_m >= 16):
        raise ConfigError(
            f"KernelConfig.block_k = {config.block_k} is invalid for this layer: expected a power of two dividing "
            f"group_size = {layout.k_limit} and at least {_fit_block_k(2, layout, config.block_m >= 16)}"
        )
    return _launch(x2d, layer, layout, config, interpret).reshape(*x.shape[:-1], layout.n)


class _LowbitLinearFn(torch.autograd.Function):
    """The kernel forward; the backward rebuilds the weight (training through packed layers is rare)."""

    @staticmethod
    def forward(ctx, x, bias, layer, interpret, config):  # noqa: ANN001, ANN205 - autograd signature
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return _forward(x, layer, interpret, config)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205 - autograd signature
        weight = ctx.layer.dequantize_weight(grad_out.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.layer.bias.dtype)
        return grad_x, grad_bias, None, None, None


def lowbit_linear(
    x: torch.Tensor, layer: Any, *, interpret: bool | None = None, config: KernelConfig | None = None
) -> torch.Tensor:
    """``layer(x)`` for a linear ``IntQuantLayer``, computed by the Triton kernel on its packed weights.

    Args:
        x: activations ``(..., in_features)``, float16 or bfloat16 (float32 also works in the
            interpreter); on CUDA, or on CPU with ``interpret=True``.
        layer: a linear ``IntQuantLayer`` with 4- or 8-bit codes (tensor, channel or group scales;
            group sizes that are multiples of 32).
        interpret: run in Triton's CPU interpreter (slow; for tests). Default: ``True`` for CPU
            inputs when ``TRITON_INTERPRET=1``, else ``False``.
        config: fixed launch parameters instead of the tuned ones.

    Returns:
        ``(..., out_features)`` in ``x``'s dtype; differentiable w.r.t. ``x`` and the bias.

    Raises:
        MissingDependencyError: triton is not installed.
        ConfigError: unsupported layer, input width or device.
    """
    reason = unsupported_reason(layer)
    if reason:
        raise ConfigError(f"no low-bit kernel for this layer: {reason}")
    if interpret is None:
        interpret = not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not interpret and not x.is_cuda:
        raise ConfigError(f"input is on {x.device}: the kernel needs CUDA tensors (or interpret=True)")
    if interpret and x.is_cuda:
        raise ConfigError("interpret=True needs CPU tensors")
    if x.device != layer.packed.device:
        raise ConfigError(f"input is on {x.device} but the layer's weights are on {layer.packed.device}")
    require_triton()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (layer.bias is not None and layer.bias.requires_grad))
    if needs_grad:
        return _LowbitLinearFn.apply(x, layer.bias, layer, interpret, config)
    return _forward(x, layer, interpret, config)

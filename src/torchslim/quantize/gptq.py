"""GPTQ: k-bit weight quantization with Hessian-based error compensation (Frantar et al., 2023).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes a layer's input columns one at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of the
layer's input Hessian ``H = 2 X^T X`` (``X``: the layer's inputs on calibration data), which minimises
``||W X - Q X||^2`` column by column. Columns are processed in blocks of ``blocksize`` with lazy updates; with
``act_order`` columns with the largest Hessian diagonal (the most active inputs) go first.

The result is exactly :class:`~torchslim.quantize.layers.IntQuantLayer`'s packed format (same codes, scales,
zero points and groups of contiguous input columns), so it saves, loads, exports and runs like ``IntQuant``.
With ``act_order`` and groups, each group's scale and zero point are computed from the original weights before
the columns are reordered ("static groups"), so groups stay contiguous in the original column order.

Layers are quantized in the order the model runs them, each on inputs that already went through the
quantized earlier layers: each pass over the calibration data stops at the first layer still to quantize and
collects the Hessians of it and of every layer fed the very same input tensor (q/k/v projections), which are
then quantized together. A layer the calibration inputs never reach is quantized by round-to-nearest (the
report says so). Works for any model with Linear/Conv1d/Conv2d layers (grouped convolutions included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torchslim._utils import eval_mode, release_free_memory
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.onload import materialize_, onloader_of
from torchslim.progress import task as progress_task
from torchslim.quantize.affine import compute_qparams, dequantize_affine, quantize_affine
from torchslim.quantize.api import (
    _HANDLERS,
    QuantizeReport,
    _replace,
    calibrated_handler,
    check_layer_config,
    nothing_to_quantize,
    plan_layers,
)
from torchslim.quantize.blockwise import Capture, capture, find_blocks, quantize_after_blocks, quantize_blocks
from torchslim.quantize.hessian import Hessian, collect_stage, layer_hessian
from torchslim.quantize.layers import SCALE_DTYPES, IntQuantLayer
from torchslim.quantize.runtime import set_runtime_

__all__ = ["GPTQ", "gptq_", "gptq_quantize", "layer_hessian"]

_CALIBRATION_LIMIT = 256  # samples taken from a Dataset / DataLoader / DataSplits
_CALIBRATION_BATCH = 32
_DAMP_RETRIES = 4
_ROWS = 4096  # weight rows quantized at a time
_CLIP_SHRINKS = torch.linspace(1.0, 0.5, 20).tolist()  # range factors clip_search tries


@register_config("gptq")
@dataclasses.dataclass(frozen=True)
class GPTQ(Config):
    """GPTQ weight-only quantization into ``IntQuantLayer``'s packed k-bit format (needs calibration inputs).

    Args:
        bits: code width, 2..8 (3 and 4 are the usual choices).
        group_size: input columns per scale/zero point (``None``: one per output channel).
        act_order: quantize columns in order of decreasing Hessian diagonal (the most active inputs first, while the
            most columns are left to absorb their error). Free at inference: groups keep their contiguous columns
            (static groups), so the packed format is the same.
        true_sequential: inside a block, quantize q/k/v, then o, then gate/up, then down, each on the outputs of
            the layers quantized before it; False: all layers of a block on the block's float activations.
        damp: dampening added to the Hessian diagonal, as a fraction of its mean, in (0, 1].
        blocksize: columns per lazy-update block (speed only; the result is the same up to rounding).
        symmetric: fixed zero point ``2**(bits-1)`` (no zero points stored) instead of min/max.
        scale_dtype: storage dtype of the scales.
        clip_search: each group's range is the min/max shrunk by the factor (1.0 down to 0.5 in 20 steps) that
            gives the smallest rounding error weighted by the Hessian diagonal (how much each input column
            matters), instead of the plain min/max: large outliers get clipped when that costs less than the
            coarser grid they force on every other weight of the group. False: plain min/max (as the GPTQ paper).
    """

    stage = "quantize"
    needs_calibration = True  # quantize_(model, GPTQ(), calib_inputs=...) calls gptq_

    bits: int = 4
    group_size: int | None = 128
    act_order: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    blocksize: int = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    clip_search: bool = True

    def validate(self) -> None:
        self.check_int("bits", 2, 8)
        if self.group_size is not None:
            self.check_int("group_size", 2)
        self.check_choice("act_order", (True, False))
        self.check_choice("true_sequential", (True, False))
        self.check_float("damp", 0.0, 1.0, lo_inclusive=False)
        self.check_int("blocksize", 1)
        self.check_choice("symmetric", (True, False))
        self.check_choice("scale_dtype", tuple(SCALE_DTYPES))
        self.check_choice("clip_search", (True, False))

    @property
    def granularity(self) -> str:
        """``"group"`` or ``"channel"`` (``group_size=None``), as in ``IntQuant``."""
        return "channel" if self.group_size is None else "group"

    @classmethod
    def from_options(cls, mode: str, options: dict[str, Any]) -> GPTQ:
        """As :meth:`Config.from_options`, with ``IntQuant``'s ``granularity`` (channel: ``group_size=None``, the
        default; group) and ``rounding`` (nearest only) options also taken."""
        options = dict(options)
        granularity = options.pop("granularity", "channel")
        if granularity not in ("channel", "group"):
            raise ConfigError(f"--granularity = {granularity!r} is invalid with --mode {mode}: expected channel or "
                              "group")
        rounding = options.pop("rounding", "nearest")
        if rounding != "nearest":
            raise ConfigError(f"--rounding = {rounding!r} is invalid with --mode {mode}: expected nearest")
        if granularity == "channel":
            options["group_size"] = None
        return super().from_options(mode, options)


# --- the algorithm on one weight matrix -------------------------------------------------------------------------
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    config: GPTQ,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize one weight matrix with GPTQ.

    Args:
        weight: ``(rows, cols)`` float weight (a conv weight flattened to ``(out, in * kh * kw)``).
        hessian: ``(cols, cols)`` input Hessian (``2 X^T X / n``; see :func:`layer_hessian`).
        config: the :class:`GPTQ` settings.

    Returns:
        ``(dequantized, scale, zero_point)``: the quantized weight ``(rows, cols)`` in float32, and scales
        ``(rows, groups)`` (``config.scale_dtype``) and int32 zero points ``(rows, groups)`` with groups of
        ``group_size`` contiguous columns (the last one partial), as ``IntQuantLayer`` stores them.

    Raises:
        ModelError: the dampened Hessian is not positive definite even after raising the dampening.
    """
    codes, scale, zero_point = _gptq_codes(weight, hessian, config)
    size = config.group_size or codes.shape[1]

    def columns(per_group: Tensor) -> Tensor:  # (rows, groups) -> one value per column
        return per_group.float().repeat_interleave(size, dim=1)[:, : codes.shape[1]]

    return (codes.float() - columns(zero_point)) * columns(scale), scale, zero_point


def _gptq_codes(weight: Tensor, hessian: Tensor, config: GPTQ) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one weight matrix as codes: ``(codes, scale, zero_point)`` with uint8 codes ``(rows, cols)`` in
    ``[0, 2**bits)`` standing for ``(codes - zero_point) * scale`` (see :func:`gptq_quantize`). Codes, not the
    float result: an lm_head's float copy would be the largest allocation of the whole run."""
    W = weight.detach().float()
    rows, cols = W.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ModelError(f"gptq: Hessian shape {tuple(hessian.shape)} does not match weight columns {cols}")
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if config.act_order else torch.arange(cols)
    importance = torch.diag(H)  # clip_search weights each column's rounding error by it
    Hinv = _inverse_cholesky(H[perm][:, perm], config.damp)
    groups = math.ceil(cols / (config.group_size or cols))
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, groups, dtype=SCALE_DTYPES[config.scale_dtype])
    zero_point = torch.empty(rows, groups, dtype=torch.int32)
    # rows are independent given the Hessian: a slice of rows at a time keeps the column updates in cache (an
    # lm_head has ~50k rows) and the temporaries small
    for r in range(0, rows, _ROWS):
        chunk = W[r : r + _ROWS].clone()
        chunk[:, dead] = 0.0
        codes[r : r + _ROWS], scale[r : r + _ROWS], zero_point[r : r + _ROWS] = _quantize_rows(
            chunk, Hinv, perm, importance, config
        )
        del chunk
        release_free_memory()  # each slice's temporaries: glibc would otherwise keep growing its heap
    return codes, scale, zero_point


def _quantize_rows(
    W: Tensor, Hinv: Tensor, perm: Tensor, importance: Tensor, config: GPTQ
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of some rows of a weight (changed in place) given the permuted inverse Hessian's Cholesky factor and
    the Hessian diagonal in the original column order (``importance``, used by ``clip_search``); returns uint8
    codes in the original column order, scales and zero points."""
    rows, cols = W.shape
    size = config.group_size or cols
    groups = math.ceil(cols / size)
    dtype = SCALE_DTYPES[config.scale_dtype]
    scale = torch.ones(rows, groups, dtype=dtype)
    zero_point = torch.zeros(rows, groups, dtype=torch.int32)

    # float32 views used in the column loop: the same arithmetic as quantize_affine / dequantization
    inv_scale = torch.ones(rows, groups)
    scale32 = torch.ones(rows, groups)
    offset = torch.zeros(rows, groups)  # zero_point + 0.5 (round to nearest)
    qmax = float((1 << config.bits) - 1)

    def set_params(group: int, columns: Tensor) -> None:
        if config.clip_search:
            s, z = _clipped_qparams(columns, importance[group * size : group * size + columns.shape[1]], config)
        else:
            s, z = compute_qparams(columns.unsqueeze(1), config.bits, config.symmetric, dtype)
        scale[:, group], zero_point[:, group] = s[:, 0], z[:, 0]
        scale32[:, group] = s[:, 0].float()
        inv_scale[:, group] = 1.0 / s[:, 0].float()
        offset[:, group] = z[:, 0].float() + 0.5

    static = config.act_order or config.group_size is None
    if static:
        for group in range(groups):
            set_params(group, W[:, group * size : (group + 1) * size])
    if config.act_order:
        W = W[:, perm]
    order = perm.tolist()
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for i1 in range(0, cols, config.blocksize):
        i2 = min(i1 + config.blocksize, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            original = order[i1 + i]
            group = original // size
            if not static and original % size == 0:  # first column of a group: params from the current values
                end = min(i1 + i + size, cols)
                current = W1[:, i : min(end, i2) - i1]
                if end > i2:  # the group runs past this block: apply this block's pending updates first
                    pending = W[:, i2:end] - E1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                    current = torch.cat([current, pending], dim=1)
                set_params(group, current)
            w = W1[:, i]
            code = torch.floor(w * inv_scale[:, group] + offset[:, group]).clamp_(0, qmax)
            codes[:, i1 + i] = code.to(torch.uint8)
            err = (w - (code - (offset[:, group] - 0.5)) * scale32[:, group]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if config.act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero_point


def _clipped_qparams(columns: Tensor, importance: Tensor, config: GPTQ) -> tuple[Tensor, Tensor]:
    """Per row, the scale/zero point of the shrunk min/max range with the least importance-weighted squared
    rounding error over ``columns`` (``(rows, n)``; ``importance``: ``(n,)``). Returns ``(rows, 1)`` tensors as
    ``compute_qparams`` does; the unshrunk range is one of the candidates, so the error is never larger."""
    grouped = columns.unsqueeze(1)
    dtype = SCALE_DTYPES[config.scale_dtype]
    best_scale = best_zero = best_error = None
    for shrink in _CLIP_SHRINKS:
        s, z = compute_qparams(grouped * shrink, config.bits, config.symmetric, dtype)
        codes = quantize_affine(grouped, s, z, config.bits)
        error = ((dequantize_affine(codes, s, z) - grouped) ** 2 * importance).sum(dim=(1, 2))
        if best_error is None:
            best_scale, best_zero, best_error = s, z, error
            continue
        better = error < best_error
        best_scale = torch.where(better.unsqueeze(1), s, best_scale)
        best_zero = torch.where(better.unsqueeze(1), z, best_zero)
        best_error = torch.minimum(error, best_error)
    return best_scale, best_zero


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising the dampening if needed."""
    H = H.double()
    mean = float(torch.diag(H).mean())
    for attempt in range(_DAMP_RETRIES):
        # one (cols, cols) float64 temporary at a time besides H: down_proj-sized Hessians are tens of MB each
        damped = H.clone()
        damped.diagonal().add_((damp * 10**attempt) * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) != 0:
            continue
        inverse = torch.cholesky_inverse(L)
        del L
        return torch.linalg.cholesky(inverse, upper=True).float()
    raise ModelError(
        f"gptq: the layer's input Hessian is not positive definite even with damp = {damp * 10 ** (_DAMP_RETRIES - 1)}"
        ": use more (or more varied) calibration inputs, or a larger GPTQ.damp"
    )


def _quantize_module(module: nn.Module, hessians: list[Tensor], config: GPTQ) -> IntQuantLayer:
    """GPTQ one layer (each conv group on its own Hessian) into an ``IntQuantLayer``."""
    matrix = module.weight.detach().float().cpu()
    matrix = matrix.reshape(matrix.shape[0], -1)
    per_group = matrix.shape[0] // len(hessians)
    parts = [
        _gptq_codes(matrix[g * per_group : (g + 1) * per_group], h, config) for g, h in enumerate(hessians)
    ]
    codes, scale, zero_point = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts, strict=True))
    del parts
    return _layer(module, codes, scale, zero_point, config)


def _quantize_modules(modules: list[nn.Module], hessians: list[Tensor], config: GPTQ) -> list[IntQuantLayer]:
    """GPTQ several layers that read one input (one Hessian): Linear layers' rows are stacked and quantized in one
    column loop (rows are independent given the Hessian, so the result is each layer's own GPTQ)."""
    if len(modules) == 1 or len(hessians) != 1 or not all(isinstance(m, nn.Linear) for m in modules):
        return [_quantize_module(m, hessians, config) for m in modules]
    stacked = torch.cat([m.weight.detach().float().cpu() for m in modules])
    codes, scale, zero_point = _gptq_codes(stacked, hessians[0], config)
    del stacked
    layers, start = [], 0
    for m in modules:
        end = start + m.out_features
        layers.append(_layer(m, codes[start:end], scale[start:end], zero_point[start:end], config))
        start = end
    return layers


def _layer(module: nn.Module, codes: Tensor, scale: Tensor, zero_point: Tensor, config: GPTQ) -> IntQuantLayer:
    return IntQuantLayer.from_codes(
        module, codes, scale, zero_point, config.bits, config.granularity, config.group_size, config.symmetric,
        config.scale_dtype,
    )


# --- calibration data -------------------------------------------------------------------------------------------
def _calibration_batches(calib_inputs: Any) -> list[tuple[Tensor, ...]]:
    """Batches of positional model inputs.

    Accepted: a tensor (one batch), a tuple of tensors (one batch of several inputs, e.g. ``(input_ids,
    attention_mask)``), a list of such batches, or a ``Dataset``/``DataLoader``/``DataSplits`` of ``(x, y)``
    samples (up to 256 inputs).
    """
    if isinstance(calib_inputs, Tensor):
        batches: list = [calib_inputs]
    elif isinstance(calib_inputs, tuple) and calib_inputs and all(isinstance(t, Tensor) for t in calib_inputs):
        batches = [calib_inputs]
    elif isinstance(calib_inputs, list):
        batches = list(calib_inputs)
    elif isinstance(calib_inputs, (Dataset, DataLoader)) or hasattr(calib_inputs, "train"):
        from torchslim.quantize.int8 import calibration_inputs

        inputs = calibration_inputs(calib_inputs, _CALIBRATION_LIMIT)
        batches = list(inputs.split(_CALIBRATION_BATCH))
    else:
        raise DataError(
            f"gptq_: calib_inputs is a {type(calib_inputs).__name__}: expected a tensor, a tuple of tensors, a list "
            "of batches, a Dataset, a DataLoader or DataSplits"
        )
    out = []
    for index, batch in enumerate(batches):
        batch = (batch,) if isinstance(batch, Tensor) else batch
        if not (isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch)):
            raise DataError(
                f"gptq_: calibration batch {index} is a {type(batch).__name__}: expected a tensor or a tuple of tensors"
            )
        if batch[0].dim() == 0 or batch[0].shape[0] == 0:
            raise DataError(f"gptq_: calibration batch {index} is empty: expected at least one sample")
        out.append(tuple(batch))
    if not out:
        raise DataError("gptq_: calib_inputs holds no batch: expected at least one calibration sample")
    return out


# --- the in-place verb ------------------------------------------------------------------------------------------
LOOPS = ("auto", "blocks", "staged")


@calibrated_handler(GPTQ)
def gptq_(
    model: nn.Module,
    config: GPTQ,
    calib_inputs: Any,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, Config | None] | None = None,
    loop: str = "auto",
    progress: bool | str | None = None,
) -> QuantizeReport:
    """Quantize the model's Linear/Conv layers with GPTQ, in place, layer by layer in execution order.

    The same layer selection as :func:`~torchslim.quantize.quantize_`; layers given another config in
    ``overrides`` (e.g. ``IntQuant(bits=8)``) are quantized by that config's handler first.

    Args:
        model: the float model.
        config: a :class:`GPTQ`.
        calib_inputs: calibration inputs (unlabelled): a tensor, a tuple of tensors passed positionally (e.g.
            ``(input_ids, attention_mask)``), a list of such batches, or a Dataset/DataLoader/DataSplits.
        filter_fn: ``filter_fn(module, name) -> bool``; false skips the layer.
        overrides: per-layer configs by module name; ``None`` skips that layer.
        loop: ``"blocks"`` (each block of the model's block list on its cached inputs; see
            :mod:`~torchslim.quantize.blockwise`), ``"staged"`` (every stage runs the model from its input) or
            ``"auto"`` (blocks where the model has a block list that can be driven so, else staged).
        progress: the blocks loop reports each block (a bar with ETA on a terminal, one line per block
            otherwise); as in :func:`torchslim.progress.resolve` (None follows the process setting: silent unless a
            command turned it on).

    Returns:
        A :class:`~torchslim.quantize.QuantizeReport`; each GPTQ layer's entry has ``"method"`` (``"gptq"``, or
        ``"round-to-nearest"`` with a ``"reason"`` for layers the calibration inputs never reached) and ``"loop"``
        (``"blocks"``/``"staged"``).

    Raises:
        ConfigError: ``config`` is not a GPTQ, an override is invalid, a bad ``loop``, or ``loop="blocks"`` for a
            model without a usable block list (nothing is changed).
        DataError: unusable calibration inputs, or the model fails on them (nothing is changed).
        ModelError: no layer to quantize, or a Hessian that cannot be inverted.
    """
    if not isinstance(config, GPTQ):
        raise ConfigError(f"config = {type(config).__name__} is invalid for gptq_: expected GPTQ")
    if loop not in LOOPS:
        raise ConfigError(f"loop = {loop!r} is invalid: expected one of {', '.join(LOOPS)}")
    batches = _calibration_batches(calib_inputs)

    def check(name: str, chosen: Config) -> None:
        check_layer_config(name, chosen, calibrated=GPTQ)

    plan, report = plan_layers(model, config, filter_fn=filter_fn, overrides=overrides, check=check)
    if not plan:
        raise nothing_to_quantize(model, report, "gptq_")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    onloader = onloader_of(model)  # a lazily loaded model: blocks are read from their file one at a time
    batches = [tuple(t.to(device) for t in batch) for batch in batches]
    runs = [(lambda b=batch: model(*b)) for batch in batches]
    others = [(name, module, chosen) for name, module, chosen in plan if not isinstance(chosen, GPTQ)]
    # no list of the original layers is kept: each float layer is freed once it is quantized
    remaining = {module: (name, chosen) for name, module, chosen in plan if isinstance(chosen, GPTQ)}
    del plan
    with eval_mode(model), torch.no_grad(), _without_kv_cache(model):
        shapes = ", ".join(str(tuple(t.shape)) for t in batches[0])
        # runs the model: a failure here changes nothing
        with onloader.streaming() if onloader is not None else contextlib.nullcontext():
            route = _choose_loop(model, runs, remaining, loop, shapes)
        release_free_memory()  # the float pass's activations
        if others or not isinstance(route, tuple):  # other configs read weights directly; staged runs whole passes
            materialize_(model)
        for name, module, chosen in others:
            _replace(model, name, _HANDLERS[type(chosen)](module, chosen))
            report.quantized[name] = chosen.to_dict()
        del others

        def quantize(stage: dict[nn.Module, Hessian]) -> None:
            release_free_memory()  # the collecting pass's activations, before the inverse Hessians' temporaries
            groups: dict[tuple, list[nn.Module]] = {}  # layers sharing a Hessian and a config go together
            for module, hessian in stage.items():
                groups.setdefault((id(hessian), remaining[module][1]), []).append(module)
            for modules in groups.values():
                chosen = remaining[modules[0]][1]
                layers = _quantize_modules(modules, stage[modules[0]].matrices(), chosen)
                for module, layer in zip(modules, layers, strict=True):
                    name, _ = remaining.pop(module)
                    _replace(model, name, layer)
                    report.quantized[name] = {**chosen.to_dict(), "method": "gptq", "loop": kind}
            release_free_memory()  # the layers replaced by earlier stages: their memory goes back to the system

        if isinstance(route, tuple):
            kind = "blocks"
            (_, blocks), captured = route
            with progress_task("gptq blocks", total=len(blocks), progress=progress) as bar:

                def on_block(index: int, layers: int) -> None:
                    bar.advance()
                    bar.line(f"block {index + 1}/{len(blocks)}: {layers} layers quantized")

                outputs = quantize_blocks(blocks, captured, remaining, quantize,
                                          true_sequential=config.true_sequential, on_block=on_block)
            inside = {id(m) for m in blocks.modules()}
            outside = [m for m in remaining if id(m) not in inside]
            quantize_after_blocks(blocks, captured, outputs, runs, outside, quantize)
            del outputs, captured
        else:
            kind = "staged"
            while remaining:
                stage = collect_stage(runs, remaining)
                if not stage:
                    break
                quantize(stage)
        for module, (name, chosen) in list(remaining.items()):  # never reached by the calibration inputs
            _replace(model, name, _round_to_nearest(module, chosen))
            report.quantized[name] = {
                **chosen.to_dict(), "method": "round-to-nearest", "loop": kind,
                "reason": "not reached by the calibration inputs",
            }
        remaining.clear()
    materialize_(model)  # blocks the calibration inputs never reached
    set_runtime_(model, "auto")  # as ts.load would (see quantize_)
    return report


def _choose_loop(
    model: nn.Module, runs: list[Callable[[], Any]], remaining: dict[nn.Module, Any], loop: str, shapes: str
) -> tuple[tuple[str, nn.ModuleList], Capture] | str:
    """The block list and its captured inputs, or ``"staged"``; runs the float model on the calibration inputs.

    Raises:
        ConfigError: ``loop="blocks"`` and the blocks cannot be used (the message says why).
        DataError: the model fails on the calibration inputs.
    """
    found = find_blocks(model, remaining) if loop != "staged" else None
    reason = "loop = 'staged'" if loop == "staged" else "no single list of same-class blocks holding the layers"
    try:
        if found is not None:
            inside = {id(m) for m in found[1].modules()}
            captured = capture(model, found[1], runs, [m for m in remaining if id(m) not in inside])
            if isinstance(captured, Capture):
                return found, captured
            reason = captured
        runs[0]()  # the staged loop's first pass would fail the same way: fail before any change
    except Exception as exc:
        raise DataError(f"gptq_: the model fails on the calibration inputs ({shapes}): {exc}") from exc
    if loop == "blocks":
        raise ConfigError(f"loop = 'blocks' is invalid for {type(model).__name__}: {reason}; expected 'auto' or "
                          "'staged'")
    return "staged"


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module):
    """Turn ``config.use_cache`` of Hugging Face modules off meanwhile (repeated passes must not grow a cache)."""
    configs = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(getattr(cfg, "use_cache", None), bool):
            configs[id(cfg)] = (cfg, cfg.use_cache)
    for cfg, _ in configs.values():
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in configs.values():
            cfg.use_cache = value


def _round_to_nearest(module: nn.Module, config: GPTQ) -> IntQuantLayer:
    return IntQuantLayer.from_float(
        module, config.bits, config.granularity, config.group_size, config.symmetric, "nearest", config.scale_dtype
    )

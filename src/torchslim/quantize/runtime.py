"""How packed layers compute on CPU: the execution path of each layer, chosen by measurement.

A packed layer (``IntQuantLayer``, ``CodebookLayer``, ``HalfLayer``) can compute its output four ways:

- ``reference``: unpack and dequantize the whole weight on every call (what the layer did before; the least
  memory, slower than the fp32 layer it replaced);
- ``dense``: decode the weight once into an fp32 tensor kept beside the packed buffers (compute equals the fp32
  layer's; resident memory = an fp32 weight);
- ``gemv``: the native (C, AVX2) integer matrix-vector product of :mod:`torchslim.kernels.cpu_gemv` on codes
  derived at first use (half a byte or one byte a weight; Linear layers with 1-8-bit codes, one input row or up to
  ``GEMV_MAX_ROWS`` rows: each block of codes is unpacked once for 4 rows at a time);
- ``sparse``: CSR ``torch.sparse.mm`` for Linear layers with >= 80% zeros, only where measured faster than dense;
- ``int8mm``: int8 x int8 products on inputs quantized per row at run time (:mod:`torchslim.kernels.cpu_int8mm`;
  Linear layers with 1-8-bit codes and one scale per output row, several input rows; ``runtime="w8a8"`` only).

The policy (``runtime``) says which paths a layer may take:

- ``"auto"`` (what :func:`torchslim.load` sets): one input row -> ``gemv`` where a micro-benchmark of this layer
  shape on this machine measured it faster than ``dense``, else ``dense``; several rows -> ``gemv`` where it
  measured faster at ``GEMV_PROBE_ROWS`` rows, for inputs of up to ``GEMV_MAX_ROWS`` rows (e.g. an LLM's short
  prompt); longer inputs and other layers -> ``dense`` (an fp32 copy is made on the first such call). Never slower
  than the fp32 layer (up to timing noise); memory up to fp32 for the layers that need it.
- ``"compact"``: ``gemv`` where it applies, else ``reference``: no fp32 copy is ever made (memory first; may be
  slower, and :func:`runtime_report` says where);
- ``"dense"``: ``dense`` everywhere; ``"reference"``: ``reference`` everywhere;
- ``"w8a8"``: ``auto``, except that inputs of several rows run ``int8mm`` where it applies and a
  micro-benchmark at ``INT8MM_ROWS`` rows measured it faster than ``dense`` (``torch._int_mm`` is slow on CPUs
  without VNNI): the activations are rounded to int8, so outputs differ from the weight-only model's (cosine >=
  0.9999 on random layers; opt-in, like peers' "int8 dynamic activation" configs; ``torchslim deploy`` checks it as
  the ``torch-w8a8`` route). Its kernel is compiled once per number of input rows (1-2 s each), so it suits fixed
  serving shapes best.

Sibling layers (a model's attention ``q_proj``/``k_proj``/``v_proj``, a gated FFN's ``gate_proj``/``up_proj``, BERT's
``query``/``key``/``value``: :data:`SIBLING_SETS`) that all take the ``gemv`` path run as one GEMV on their stacked
codes: the first of them called on a row computes all their outputs, and the others return theirs when called on an
equal input; a sibling called on another input turns the stacking off for that set (each layer then runs alone).

Paths are chosen per layer and per input kind (one row / several rows) on the first call of that kind, and are
recorded on the layer (:func:`runtime_report`). Fast paths run in eval mode on CPU when no gradient is needed for
the layer's stored weights; training, autograd through a codebook or fp16 weight, tracing and compiling the model
take the reference path. Benchmarks of a layer shape are cached in memory and in ``$TORCHSLIM_CACHE_DIR``
(default ``~/.cache/torchslim``) ``/cpu-paths.json``, so the second load does not measure again; derived tensors
are never saved (``.slim`` files do not change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim._utils import first_line
from torchslim.artifact import RUNTIMES
from torchslim.errors import ConfigError
from torchslim.fileio import atomic_write_text
from torchslim.kernels import cpu_gemv, cpu_int8mm

__all__ = ["RUNTIMES", "fast_forward", "rebind_", "runtime_report", "set_runtime_"]

_CACHE_FILE = "cpu-paths.json"
_MEASURED: dict[str, dict[str, float]] = {}
# fp32 bytes of weights rotated through while timing a layer: 8x the development machine's 32 MiB L3, so a large
# model's weights come from memory as in a real forward pass (with 64 MiB the fp32 copies still hit the L3 often
# enough that an int4 LLM's attention projections were wrongly kept dense); a small model is timed on as many
# copies as it has bytes (it stays cached).
_ROTATION_BYTES_CAP = 256 << 20
_MAX_COPIES = 256
# A model whose packed layers hold fewer weights than this (32 MiB in fp32) runs from the CPU caches, where the
# GEMV does not beat F.linear on a small layer; then only layers of at least MIN_GEMV_WEIGHTS are compiled and
# timed. In a larger model every layer's weight comes from memory and every Linear is timed (SmolLM2-135M's
# 576 x 576 projections measured 2.6x fp32 on 48 rotating copies in a scratch run during development).
MIN_MODEL_WEIGHTS = 8 << 20
MIN_GEMV_WEIGHTS = 1 << 19
# Inputs of several rows (an LLM's short prompt) run the GEMV too, which reads each weight once for all rows, when
# it measured faster than dense at GEMV_PROBE_ROWS rows; beyond GEMV_MAX_ROWS rows the fp32 product wins (SmolLM2
# shapes, int4 g128, 2 threads: 1.1-1.8x dense at 16 rows, 0.6-1.1x at 32; scratch run 2026-12-03).
GEMV_PROBE_ROWS = 16
GEMV_MAX_ROWS = 16
INT8MM_ROWS = 256  # rows at which runtime='w8a8' times the int8 product against F.linear
SPARSE_MIN_ZEROS = 0.8  # below this CSR lost to dense in every measured shape (benchmarks/sparse_cpu.py)
_NO_GRAD_PATHS = ("gemv", "int8mm")  # kernels without autograd: a call that needs gradients takes dense
# Children of one module that models call in turn on the same input. One GEMV on their stacked codes saves the
# per-call cost of the others (~20 us each; SmolLM2's 211 GEMVs a token become 121).
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                ("w1", "w3"))


@dataclasses.dataclass
class _LayerState:
    """What a packed layer derived at run time (plain attributes: never in ``state_dict``, never saved)."""

    policy: str
    model_bytes: int = 0
    trainable: list[Tensor] | None = None  # weight parameters (codebook, fp16 weight); None: not bound yet
    # one row? -> (function of x, needs grad disabled): the chosen path, built once (float32 inputs)
    ready: dict[bool, tuple[Callable[[Tensor], Tensor], bool]] = dataclasses.field(default_factory=dict)
    paths: dict[str, str] = dataclasses.field(default_factory=dict)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    dense: Tensor | None = None
    pack: cpu_gemv.GemvPack | None = None
    csr: Tensor | None = None
    int8: cpu_int8mm.Int8Pack | None = None
    siblings: _Siblings | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle) keep the decisions and rebuild derived tensors from their own layer: closures
        # and tensors here belong to the original layer (and CSR tensors cannot be deep-copied). A copy runs its
        # layers alone: the sibling set names the original's layers.
        state = self.__dict__.copy()
        state.update(trainable=None, ready={}, dense=None, pack=None, csr=None, int8=None, siblings=None)
        return state


class _Siblings:
    """Packed Linear layers that a model calls in turn on one input row, computed by one GEMV on stacked codes.

    The first member called on a row computes every member's output and keeps the others' until they are asked
    for on an equal input (compared by value, so the result is the one each layer would compute alone). A member
    called on another input while outputs are still waiting ends the stacking for good (:meth:`give_up`).
    """

    def __init__(self, layers: list[nn.Module], names: tuple[str, ...]) -> None:
        self.layers, self.names = layers, names
        self.sizes = [int(layer.weight_shape[0]) for layer in layers]
        self.disabled = False
        self.pack: cpu_gemv.GemvPack | None = None
        self.run: Callable[[Tensor], Tensor] | None = None
        self.last_input: Tensor | None = None
        self.pending: list[Tensor | None] = [None] * len(layers)

    def clear(self) -> None:
        """Drop the stacked codes and any waiting outputs (a member's stored tensors changed)."""
        self.pack, self.run, self.last_input = None, None, None
        self.pending = [None] * len(self.layers)

    def usable(self) -> bool:
        """True when every member takes the ``gemv`` path at one row (members not called yet decide now)."""
        if self.disabled:
            return False
        for layer in self.layers:
            state = layer._runtime_state
            if "1 row" not in state.paths:
                state.paths["1 row"], state.reasons["1 row"] = _choose(layer, state, "1 row")
            if state.paths["1 row"] != "gemv":
                self.disabled = True
                return False
        return True

    def member(self, index: int) -> Callable[[Tensor], Tensor]:
        """The function of one member's input giving that member's output."""

        def run(x: Tensor) -> Tensor:
            waiting = self.pending[index]
            if waiting is not None and _same(x, self.last_input):
                self.pending[index] = None
                return waiting
            if any(p is not None for p in self.pending):  # not called in turn on one input
                return self.give_up(index)(x)
            if self.run is None:
                try:
                    self._build()
                except ValueError:  # e.g. one member has a last, shorter group and another not
                    return self.give_up(index)(x)
            outputs = list(self.run(x).split(self.sizes, -1))
            self.last_input = _derived(lambda: x.detach().clone())
            self.pending = [None if i == index else out for i, out in enumerate(outputs)]
            return outputs[index]

        return run

    def give_up(self, index: int) -> Callable[[Tensor], Tensor]:
        """Stop stacking: every member runs its own GEMV from now on; returns member ``index``'s function."""
        self.disabled = True
        self.clear()
        for layer in self.layers:
            layer._runtime_state.ready.pop(True, None)
            reasons = layer._runtime_state.reasons
            reasons["1 row"] = reasons.get("1 row", "gemv") + "; not called in turn on one input: runs alone"
        layer = self.layers[index]
        return _build(layer, layer._runtime_state, "gemv")

    def _build(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.pack = cpu_gemv.stack([cpu_gemv.prepack(layer) for layer in self.layers])
            biases = [layer.bias.detach().float() if layer.bias is not None else torch.zeros(size)
                      for layer, size in zip(self.layers, self.sizes, strict=True)]
            bias = torch.cat(biases) if any(layer.bias is not None for layer in self.layers) else None
        self.run = cpu_gemv.bind(self.pack, bias)


def _same(x: Tensor, seen: Tensor | None) -> bool:
    return seen is not None and x.shape == seen.shape and x.dtype == seen.dtype and torch.equal(x, seen)


def _group_siblings(model: nn.Module) -> int:
    """Give each set of :data:`SIBLING_SETS` children (packed Linear layers of one input length) a shared
    :class:`_Siblings`; returns the number of sets."""
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLING_SETS:
            layers = [children.get(name) for name in names]
            if not all(getattr(layer, "_runtime_state", None) is not None and hasattr(layer, "codes")
                       and layer.op == "linear" for layer in layers):
                continue
            if len({int(layer.weight_shape[1]) for layer in layers}) != 1:
                continue
            group = _Siblings(layers, names)
            for layer in layers:
                layer._runtime_state.siblings = group
            count += 1
    return count


def set_runtime_(model: nn.Module, runtime: str = "auto") -> int:
    """Set the execution policy of every packed layer of ``model`` (in place; nothing is decoded yet).

    Args:
        model: any model; its ``IntQuantLayer``/``CodebookLayer``/``HalfLayer`` modules are affected.
        runtime: one of :data:`RUNTIMES`.

    Returns:
        The number of packed layers.

    Raises:
        ConfigError: unknown ``runtime`` (the message lists the allowed ones).
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime = {runtime!r} is invalid: expected one of {', '.join(map(repr, RUNTIMES))}")
    layers = [m for m in model.modules() if hasattr(m, "dequantize_weight") or hasattr(m, "dtype_name")]
    layers = [m for m in layers if hasattr(m, "weight_shape")]
    model_bytes = sum(_fp32_bytes(m) for m in layers)
    for layer in layers:
        layer._runtime_state = _LayerState(policy=runtime, model_bytes=model_bytes)
        rebind_(layer)
    if runtime in ("auto", "compact", "w8a8"):
        _group_siblings(model)
    return len(layers)


def rebind_(layer: nn.Module) -> None:
    """Drop what a layer derived from its stored tensors; the next call rebuilds it.

    Packed layers call it after ``.to()``/``.half()`` (``_apply``), ``load_state_dict`` and a switch from training
    to eval mode; call it yourself after changing a packed layer's buffers in place.
    """
    state = layer.__dict__.get("_runtime_state")
    if state is not None:
        state.trainable = [p for n, p in layer.named_parameters(recurse=False) if n != "bias"]
        state.dense, state.pack, state.csr, state.int8 = None, None, None, None
        state.ready.clear()
        if state.siblings is not None:
            state.siblings.clear()


def runtime_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per packed layer: its policy, the path taken per input kind so far, why, and the memory it costs.

    Returns:
        One dict per packed layer: ``name``, ``type``, ``policy``, ``paths`` (``{"1 row"|"rows": path}``),
        ``reasons`` (same keys), ``stored_bytes`` (the packed buffers), ``derived_bytes`` (the fp32 copy and
        kernel codes held now).
    """
    rows = []
    for name, module in model.named_modules():
        state = getattr(module, "_runtime_state", None)
        if state is None:
            continue
        derived = 0 if state.dense is None else state.dense.numel() * state.dense.element_size()
        derived += 0 if state.pack is None else state.pack.nbytes
        derived += 0 if state.int8 is None else state.int8.nbytes
        group = state.siblings
        if group is not None and group.pack is not None and group.layers[0] is module:  # counted once
            derived += group.pack.nbytes
        if state.csr is not None:
            derived += sum(t.numel() * t.element_size() for t in (state.csr.values(), state.csr.col_indices(),
                                                                   state.csr.crow_indices()))
        stored = sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
        stored += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        rows.append({"name": name, "type": type(module).__name__, "policy": state.policy,
                     "paths": dict(state.paths), "reasons": dict(state.reasons),
                     "stored_bytes": stored, "derived_bytes": derived})
    return rows


def fast_forward(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The layer's output through its chosen fast path, or None when the reference path must run.

    Args:
        layer: a packed layer (``run``, ``dequantize_weight`` or ``weight``, ``weight_shape``).
        x: its input.
    """
    state: _LayerState | None = layer.__dict__.get("_runtime_state")
    if state is None or layer.training or state.policy == "reference":
        return None
    if state.trainable is None:  # a fresh or copied state: bind it to this layer's tensors
        rebind_(layer)
    one_row = layer.op == "linear" and x.numel() == x.shape[-1]
    entry = state.ready.get(one_row)
    if entry is not None and x.dtype == torch.float32 and x.is_cpu:  # the hot path: one lookup, one call
        fn, no_grad_only = entry
        grad = torch.is_grad_enabled()
        if not (grad and (no_grad_only or state.trainable)) and not torch.compiler.is_compiling() \
                and not torch.jit.is_tracing():
            return fn(x)
    if not x.is_cpu or not x.is_floating_point() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    if grad and state.trainable and any(p.requires_grad for p in state.trainable):
        return None
    bucket = "1 row" if one_row else "rows"
    path = state.paths.get(bucket)
    if path is None:
        path, reason = _choose(layer, state, bucket)
        state.paths[bucket], state.reasons[bucket] = path, reason
    if path in _NO_GRAD_PATHS and grad:
        path = "dense" if state.policy != "compact" else "reference"
    if path == "reference":
        return None
    fn = _build(layer, state, path)
    if path == "gemv" and not one_row:
        fn = _short_inputs_only(layer, state, fn)
    if x.dtype == torch.float32 and path == state.paths[bucket]:
        state.ready[one_row] = (fn, path in _NO_GRAD_PATHS)
    if path == "dense" and x.dtype != torch.float32:  # e.g. a float16 input: the weight is cast to it
        return layer.run(x, state.dense)
    return fn(x)


def _short_inputs_only(layer: nn.Module, state: _LayerState, gemv: Callable[[Tensor], Tensor]
                       ) -> Callable[[Tensor], Tensor]:
    """``gemv`` for inputs of up to GEMV_MAX_ROWS rows; longer ones (a long prompt) take ``dense`` (decoded once,
    when first needed) or, under ``compact``, the reference computation."""
    in_features, longer = int(layer.weight_shape[1]), None

    def run(x: Tensor) -> Tensor:
        nonlocal longer
        if x.numel() <= GEMV_MAX_ROWS * in_features:
            return gemv(x)
        if longer is None:  # layer.run casts the weight to the input's dtype (e.g. a float16 input)
            if state.policy == "compact":
                longer = lambda x: layer.run(x, layer.dequantize_weight(x.dtype))  # noqa: E731
            else:
                _build(layer, state, "dense")
                longer = lambda x: layer.run(x, state.dense)  # noqa: E731
        return longer(x)

    return run


def _build(layer: nn.Module, state: _LayerState, path: str) -> Callable[[Tensor], Tensor]:
    """The function of a float32 input that runs ``path`` (derived tensors built now)."""
    bias = layer.bias
    if path == "sparse":
        if state.csr is None:
            state.csr = _derived(lambda: _to_csr(_float_weight(layer)))
        return _sparse_linear(state.csr, bias)
    if path == "int8mm":
        if state.int8 is None:
            state.int8 = _derived(lambda: cpu_int8mm.prepack(layer))
        return cpu_int8mm.bind(state.int8, bias)
    if path == "gemv":
        group = state.siblings
        if group is not None and group.usable():
            index = next(i for i, member in enumerate(group.layers) if member is layer)
            others = ", ".join(name for i, name in enumerate(group.names) if i != index)
            if "stacked" not in state.reasons["1 row"]:
                state.reasons["1 row"] += f"; stacked with {others} in one GEMV"
            return group.member(index)
        if state.pack is None:
            state.pack = _derived(lambda: cpu_gemv.prepack(layer))
        return cpu_gemv.bind(state.pack, bias)
    if state.dense is None:
        state.dense = _derived(lambda: _float_weight(layer))
    weight = state.dense
    if bias is not None and bias.dtype != torch.float32:  # an fp16/bf16 layer: its bias in float32, once
        bias = _derived(lambda: layer.bias.detach().float())
    if layer.op == "linear":
        return lambda x: F.linear(x, weight, bias)
    conv = F.conv1d if layer.op == "conv1d" else F.conv2d
    stride, padding = tuple(layer.conv["stride"]), tuple(layer.conv["padding"])
    dilation, groups = tuple(layer.conv["dilation"]), layer.conv["groups"]
    return lambda x: conv(x, weight, bias, stride, padding, dilation, groups)


def _to_csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": we measure before using it
        warnings.simplefilter("ignore", UserWarning)
        return weight.to_sparse_csr()


def _sparse_linear(csr: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(csr, flat.t()).t()
        y = y + bias if bias is not None else y.contiguous()
        return y.reshape(*x.shape[:-1], csr.shape[0])

    return run


def _derived(build) -> Tensor:
    """Build a derived tensor as a normal tensor (usable outside ``inference_mode``), without autograd history."""
    with torch.inference_mode(False), torch.no_grad():
        return build()


def _float_weight(layer: nn.Module) -> Tensor:
    if hasattr(layer, "dequantize_weight"):
        return layer.dequantize_weight(torch.float32).contiguous()
    return layer.weight.detach().to(torch.float32).contiguous()


def _fp32_bytes(layer: nn.Module) -> int:
    numel = 1
    for d in layer.weight_shape:
        numel *= int(d)
    return 4 * numel


def _choose(layer: nn.Module, state: _LayerState, bucket: str) -> tuple[str, str]:
    """(path, reason) for this layer and input kind under its policy."""
    if state.policy == "dense":
        return "dense", "runtime='dense'"
    if state.policy == "w8a8" and bucket == "rows":
        reason = cpu_int8mm.unsupported_reason(layer)
        if reason is None:
            error = _int8mm_error(layer, state)
            if error is None:
                return _int8mm_choice(layer, state)
            reason = f"the compiled int8 product failed here ({error})"
        return "dense", f"{reason}; decoded once"
    reason = cpu_gemv.unsupported_reason(layer) if hasattr(layer, "codes") else (
        f"{type(layer).__name__}: the integer GEMV takes integer codes")
    rows = 1 if bucket == "1 row" else GEMV_PROBE_ROWS
    weights, model_weights = _fp32_bytes(layer) // 4, state.model_bytes // 4
    small = weights < MIN_GEMV_WEIGHTS and model_weights < MIN_MODEL_WEIGHTS
    if reason is None and state.policy in ("auto", "w8a8") and small:
        reason = (f"{weights:,} weights in a model of {model_weights:,}: below {MIN_GEMV_WEIGHTS:,} and "
                  f"{MIN_MODEL_WEIGHTS:,} the fp32 layer runs from cache and is as fast")
    sparse = _sparse_choice(layer, bucket) if layer.op == "linear" else None
    if sparse is not None and (reason is not None or state.policy == "compact"):
        return sparse
    if reason is not None:
        return ("reference", f"{reason}; runtime='compact' keeps no fp32 copy") if state.policy == "compact" else (
            "dense", f"{reason}; decoded once")
    timing = _measure(layer, state.model_bytes, rows)  # also proves the kernel compiles here
    if "error" in timing:
        fallback = "reference" if state.policy == "compact" else "dense"
        return fallback, f"the native GEMV failed here ({timing['error']}); {fallback} path"
    longer = "" if rows == 1 else (f"; inputs of more than {GEMV_MAX_ROWS} rows: "
                                   + ("reference" if state.policy == "compact" else "dense, decoded once"))
    if state.policy == "compact":
        return "gemv", "runtime='compact'" + longer
    speed = timing["dense_ms"] / timing["gemv_ms"]
    at = "" if rows == 1 else f" at {rows} rows"
    detail = f"gemv {timing['gemv_ms']:.3f} ms vs dense {timing['dense_ms']:.3f} ms{at} ({speed:.2f}x)"
    return ("gemv", detail + longer) if speed > 1.0 else ("dense", detail + "; the fp32 layer is faster here")


def _int8mm_error(layer: nn.Module, state: _LayerState) -> str | None:
    """None when the int8 product compiles and runs here (its codes are kept), else the first line of the error."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            state.int8 = cpu_int8mm.prepack(layer)
            cpu_int8mm.linear(torch.zeros(2, layer.weight_shape[1]), state.int8)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an inductor bug: fall back, say why
        state.int8 = None
        return first_line(exc, 200)
    return None


def _int8mm_choice(layer: nn.Module, state: _LayerState) -> tuple[str, str]:
    """("int8mm", why) where the int8 product measured faster than the fp32 layer at INT8MM_ROWS rows, else
    ("dense", why) with the int8 codes dropped. ``torch._int_mm`` has no fast kernel on some CPUs: on an AVX2 CPU
    without VNNI it ran a 4096 x 384 by 384 x 1536 product 37x slower than fp32 ``F.linear`` (2026-12-03)."""
    out_features, in_features = layer.weight_shape

    def measure() -> dict[str, float]:
        with torch.inference_mode():
            x = torch.randn(INT8MM_ROWS, in_features, generator=torch.Generator().manual_seed(0))
            weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1))
            run = cpu_int8mm.bind(state.int8)
            run(x)  # compiled for this row count before timing
            return {"dense_ms": _median_ms(lambda: F.linear(x, weight)), "int8mm_ms": _median_ms(lambda: run(x))}

    timing = _cached_timing(_shape_signature("int8mm", out_features, in_features) + f"-r{INT8MM_ROWS}", measure)
    speed = timing["dense_ms"] / timing["int8mm_ms"]
    detail = (f"runtime='w8a8': int8 x int8 {timing['int8mm_ms']:.3f} ms vs dense {timing['dense_ms']:.3f} ms at "
              f"{INT8MM_ROWS} rows ({speed:.2f}x)")
    if speed > 1.0:
        return "int8mm", detail + "; int8 activations (rounded per row) x int8 codes"
    state.int8 = None
    return "dense", detail + "; the fp32 layer is faster here, decoded once"


def _sparse_choice(layer: nn.Module, bucket: str) -> tuple[str, str] | None:
    """("sparse", why) when this layer's weight is sparse enough and CSR measured faster than dense, else None.

    Measured on the layer's own weight, at 1 input row or 32: on this project's machine CSR paid from about 90%
    zeros at batch 32 and 95% at batch 1, and lost below (benchmarks/sparse_cpu.py). The result is cached by
    (shape, nonzero count, rows), so the model that was saved and the one loaded back take the same path.
    """
    with torch.inference_mode():
        weight = _float_weight(layer)
        nonzero = int(torch.count_nonzero(weight))
        zeros = 1.0 - nonzero / max(1, weight.numel())
        if zeros < SPARSE_MIN_ZEROS:
            return None
        rows = 1 if bucket == "1 row" else 32

        def measure() -> dict[str, float]:
            run = _sparse_linear(_to_csr(weight), None)
            x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
            return {"dense_ms": _median_ms(lambda: F.linear(x, weight)), "sparse_ms": _median_ms(lambda: run(x))}

        signature = _shape_signature("sparse", *weight.shape) + f"-nz{nonzero}-r{rows}"
        timing = _cached_timing(signature, measure)
    dense_ms, sparse_ms = timing["dense_ms"], timing["sparse_ms"]
    detail = f"{zeros:.1%} zeros: CSR {sparse_ms:.3f} ms vs dense {dense_ms:.3f} ms ({dense_ms / sparse_ms:.2f}x)"
    return ("sparse", detail) if sparse_ms < dense_ms else None


def _shape_signature(kind: str, out_features: int, in_features: int) -> str:
    """The cache key prefix of a timing: what was timed, on which torch, CPU and thread count, for which shape."""
    return (f"{kind}-torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-t{torch.get_num_threads()}-"
            f"linear{out_features}x{in_features}")


def _signature(layer: nn.Module, copies: int) -> str:
    group = layer.group_size if layer.granularity == "group" else layer.granularity
    return _shape_signature(f"gemv{cpu_gemv.VERSION}", *layer.weight_shape) + f"-b{layer.bits}-g{group}-c{copies}"


def _cache_path() -> Path:
    return Path(os.environ.get("TORCHSLIM_CACHE_DIR") or Path.home() / ".cache" / "torchslim") / _CACHE_FILE


def _read_cache() -> dict[str, dict[str, float]]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(signature: str, timing: dict[str, float]) -> None:
    data = _read_cache()
    data[signature] = timing
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_path(), json.dumps(data, indent=1, sort_keys=True))
    except OSError:  # a read-only home: the in-memory cache still serves this process
        pass


def _measure(layer: nn.Module, model_bytes: int, rows: int = 1) -> dict[str, Any]:
    """Median ms of the GEMV and of the fp32 ``F.linear`` for this layer's shape at ``rows`` input rows, on rotating
    weight copies."""
    layer_bytes = _fp32_bytes(layer)
    copies = max(1, min(_MAX_COPIES, min(model_bytes, _ROTATION_BYTES_CAP) // max(1, layer_bytes)))
    signature = _signature(layer, copies) + (f"-r{rows}" if rows > 1 else "")
    return _cached_timing(signature, lambda: _time_paths(layer, copies, rows))


def _cached_timing(signature: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The timing kept under ``signature`` in this process or in the cache file, else ``measure()``'s (kept; written
    to the file unless it holds an ``"error"``, so a failed build is retried in the next process)."""
    timing = _MEASURED.get(signature) or _read_cache().get(signature)
    if timing is None:
        timing = measure()
        if "error" not in timing:
            _write_cache(signature, timing)
    _MEASURED[signature] = timing
    return timing


def _median_ms(fn: Callable[[], Any]) -> float:
    return sorted(_timed(fn) for _ in range(3))[1]


def _time_paths(layer: nn.Module, copies: int, rows: int = 1, rounds: int = 5) -> dict[str, Any]:
    out_features, in_features = layer.weight_shape
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        template = cpu_gemv.prepack(layer)
        levels = 1 << layer.bits
        def random_codes(like: Tensor) -> Tensor:
            return torch.randint(0, levels, like.shape, generator=generator, dtype=torch.int32).to(torch.uint8)

        packs = [dataclasses.replace(template, codes=random_codes(template.codes)) for _ in range(copies)]
        weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
        x = torch.randn(rows, in_features, generator=generator)
        try:
            bound = [cpu_gemv.bind(pack) for pack in packs]  # builds the native kernel on first use
            for run in bound[:2]:
                run(x)
        except Exception as exc:  # noqa: BLE001 - no C compiler, a failed build: fall back, say why
            return {"error": first_line(exc, 200)}
        gemv_times, dense_times = [], []
        for _ in range(rounds):
            gemv_times.append(_timed(lambda: [run(x) for run in bound]) / copies)
            dense_times.append(_timed(lambda: [torch.nn.functional.linear(x, w) for w in weights]) / copies)
    return {"gemv_ms": sorted(gemv_times)[rounds // 2], "dense_ms": sorted(dense_times)[rounds // 2]}


def _timed(fn) -> float:
    start = time.perf_counter()
    repeats = 0
    while True:
        fn()
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed > 0.01:
            return elapsed / repeats * 1e3

"""AWQ: activation-aware weight scaling before k-bit quantization (Lin et al., 2024).

A few input channels of a transformer's Linear layers carry much larger activations than the rest; their weights
matter most, and round-to-nearest gives them the same relative error as every other weight. AWQ multiplies each
input column ``j`` of the weight by ``s_j`` before quantizing and divides the input by ``s_j``
(``W x = (W diag(s)) (diag(s)^-1 x)``), which gives the salient columns finer steps. The division is folded into
whatever produces the input, so the float model computes the same function and nothing is added at run time:

- layers fed by a normalisation layer (q/k/v after ``input_layernorm``, gate/up after
  ``post_attention_layernorm``): its elementwise weight (and bias) is divided by ``s``;
- a gated FFN's ``down_proj`` (fed by ``act(gate) * up``): ``up_proj``'s output rows are divided by ``s``.

Each fold is checked: the block must give the same outputs afterwards (a norm computing ``x * (1 + w)``, as in
Gemma, does not fold this way and is left unscaled). Per group of layers sharing an input, ``s = mean|x|^a``
(normalised) with ``a`` chosen on a grid in ``[0, 1)`` by the output error of the quantized layers on the
calibration activations; ``a = 0`` is plain round-to-nearest, so on those activations the chosen scaling never
does worse than it. The scaled model is then quantized by round-to-nearest (``then="rtn"``, the original AWQ) or
by GPTQ (``then="gptq"``) into :class:`~torchslim.quantize.layers.IntQuantLayer`'s packed format: files save,
load, export and run like ``IntQuant``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchslim._utils import eval_mode
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError
from torchslim.onload import materialize_
from torchslim.quantize.affine import compute_qparams, dequantize_affine, grouped_view, quantize_affine
from torchslim.quantize.api import IntQuant, QuantizeReport, calibrated_handler, plan_layers, quantize_
from torchslim.quantize.blockwise import Capture, capture, find_blocks
from torchslim.quantize.gptq import GPTQ, _calibration_batches, _without_kv_cache, gptq_
from torchslim.quantize.layers import SCALE_DTYPES

__all__ = ["AWQ", "awq_", "awq_scale_"]

THEN = ("rtn", "gptq")
_FOLD_TOLERANCE = 1e-3  # relative change of a block's outputs above which a fold is undone


@register_config("awq")
@dataclasses.dataclass(frozen=True)
class AWQ(Config):
    """Activation-aware scaling, then k-bit weight-only quantization (needs calibration inputs).

    Args:
        bits: code width, 2..8.
        group_size: input columns per scale/zero point (``None``: one per output channel).
        symmetric: fixed zero point ``2**(bits-1)`` instead of min/max.
        grid: exponents ``a`` tried in ``[0, 1)`` (``grid`` of them, evenly spaced).
        then: ``"rtn"`` (round-to-nearest, the original AWQ) or ``"gptq"`` (GPTQ on the scaled model, with GPTQ's
            defaults, ``clip_search`` included).
        max_rows: activation rows per layer group used to score an exponent (a random subset when there are more).
        scale_dtype: storage dtype of the scales.
    """

    stage = "quantize"
    needs_calibration = True  # quantize_(model, AWQ(), calib_inputs=...) calls awq_

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    grid: int = 20
    then: str = "rtn"
    max_rows: int = 2048
    scale_dtype: str = "float16"

    def validate(self) -> None:
        self.check_int("bits", 2, 8)
        if self.group_size is not None:
            self.check_int("group_size", 2)
        self.check_choice("symmetric", (True, False))
        self.check_int("grid", 1, 1000)
        self.check_choice("then", THEN)
        self.check_int("max_rows", 16)
        self.check_choice("scale_dtype", tuple(SCALE_DTYPES))

    @property
    def granularity(self) -> str:
        """``"group"`` or ``"channel"`` (``group_size=None``), as in ``IntQuant``."""
        return "channel" if self.group_size is None else "group"


def fake_quantize(weight: Tensor, config: AWQ) -> Tensor:
    """``weight`` quantized and dequantized by round-to-nearest with ``config``'s bits, groups and symmetry."""
    grouped = grouped_view(weight, config.granularity, config.group_size, pad=True)
    scale, zero_point = compute_qparams(grouped, config.bits, config.symmetric, SCALE_DTYPES[config.scale_dtype])
    restored = dequantize_affine(quantize_affine(grouped, scale, zero_point, config.bits), scale, zero_point)
    return restored.reshape(weight.shape[0], -1)[:, : weight.shape[1]]


@dataclasses.dataclass
class _Group:
    """Linear layers of one block that read the same input, and what made that input."""

    layers: list[nn.Linear]
    producer: nn.Module | None
    rows: list[Tensor] = dataclasses.field(default_factory=list)


def awq_scale_(
    model: nn.Module,
    config: AWQ,
    calib_inputs: Any,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Scale the input columns of the model's block Linear layers and fold the inverse into their input's producer.

    The float model computes the same function afterwards (up to float rounding); only its weights changed.

    Args:
        model: a float model with one list of transformer blocks (Hugging Face decoders and encoders).
        config: an :class:`AWQ`.
        calib_inputs: calibration inputs, as for :func:`~torchslim.quantize.gptq_`.
        filter_fn: ``filter_fn(module, name) -> bool``; layers for which it is false are left alone.

    Returns:
        Per group (its layer names joined by ``,``): ``exponent`` (0: left unscaled), ``folded_into`` (a module
        name or None), ``error_rtn`` and ``error_awq`` (mean squared output error of the quantized group on the
        scoring rows), and ``reason`` when a group was left unscaled.

    Raises:
        ConfigError: ``config`` is not an AWQ, or the model has no list of blocks that can be driven one by one.
        DataError: unusable calibration inputs, or the model fails on them (nothing is changed).
    """
    if not isinstance(config, AWQ):
        raise ConfigError(f"config = {type(config).__name__} is invalid for awq_: expected AWQ")
    batches = _calibration_batches(calib_inputs)
    plan, _ = plan_layers(model, IntQuant(), filter_fn=filter_fn)
    linears = {module: name for name, module, _ in plan if isinstance(module, nn.Linear)}
    found = find_blocks(model, linears)
    if found is None:
        raise ConfigError(f"AWQ is invalid for {type(model).__name__}: it needs one list of same-class blocks "
                          "(a transformer's layers); use IntQuant or GPTQ")
    blocks = found[1]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    runs = [(lambda b=tuple(t.to(device) for t in batch): model(*b)) for batch in batches]
    inside = {id(m) for m in blocks.modules()}
    results: dict[str, dict[str, Any]] = {}
    generator = torch.Generator().manual_seed(0)
    with eval_mode(model), torch.no_grad(), _without_kv_cache(model):
        try:
            captured = capture(model, blocks, runs, [m for m in linears if id(m) not in inside])
        except Exception as exc:
            raise DataError(f"awq_: the model fails on the calibration inputs: {exc}") from exc
        if not isinstance(captured, Capture):
            raise ConfigError(f"AWQ is invalid for {type(model).__name__}: {captured}")
        names = {m: n for n, m in model.named_modules()}
        xs = captured.inputs
        for block, extra in zip(blocks, captured.extra, strict=True):
            def run(x: Tensor, args: tuple, kwargs: dict, block: nn.Module = block) -> Tensor:
                out = block(*args, hidden_states=x, **kwargs) if captured.keyword else block(x, *args, **kwargs)
                return out if isinstance(out, Tensor) else out[0]

            groups = _observe(block, [lambda x=x, e=e: run(x, *e) for x, e in zip(xs, extra, strict=True)],
                              linears)
            for group in groups:
                key = ",".join(linears[m] for m in group.layers)
                results[key] = _scale_group(group, block, names, config, generator,
                                            lambda x=xs[0], e=extra[0]: run(x, *e))
            xs = [run(x, *e) for x, e in zip(xs, extra, strict=True)]
    return results


def _observe(block: nn.Module, runs: list[Callable[[], Tensor]], linears: dict[nn.Module, str]) -> list[_Group]:
    """Run the block on its cached inputs: its Linear layers grouped by shared input, with the input rows."""
    made_by: dict[int, nn.Module] = {}
    by_input: dict[int, _Group] = {}
    leaders: dict[nn.Module, _Group] = {}  # the first layer of each group records the rows
    keep: list[Tensor] = []  # tensors stay alive during a run, so their ids stay unique
    first = [True]

    def produced(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            made_by[id(output)] = module
            keep.append(output)

    def consumed(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if first[0]:
            group = by_input.get(id(x))
            if group is None:
                group = by_input[id(x)] = leaders[module] = _Group([], made_by.get(id(x)))
                keep.append(x)
            group.layers.append(module)
        if module in leaders:
            leaders[module].rows.append(x.detach().reshape(-1, x.shape[-1]).float())

    members = [m for m in block.modules() if m in linears]
    handles = [m.register_forward_hook(produced) for m in block.modules() if m is not block]
    handles += [m.register_forward_pre_hook(consumed) for m in members]
    try:
        for run in runs:
            run()
            first[0] = False
            made_by.clear()
            keep.clear()
    finally:
        for handle in handles:
            handle.remove()
    return list(leaders.values())


def _scale_group(group: _Group, block: nn.Module, names: dict[nn.Module, str], config: AWQ,
                 generator: torch.Generator, block_output: Callable[[], Tensor]) -> dict[str, Any]:
    """Choose the exponent for one group, apply it and fold it; undo when the block's outputs change."""
    rows = torch.cat(group.rows)
    group.rows.clear()
    magnitude = rows.abs().mean(0)
    if rows.shape[0] > config.max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[: config.max_rows]]
    weight = torch.cat([layer.weight.detach().float() for layer in group.layers])
    reference = rows @ weight.T
    errors = []
    for step in range(config.grid):
        scales = _scales(magnitude, step / config.grid)
        restored = fake_quantize(weight * scales, config) / scales
        errors.append(float((rows @ restored.T - reference).pow(2).mean()))
    best = min(range(config.grid), key=errors.__getitem__)
    result: dict[str, Any] = {"exponent": best / config.grid, "folded_into": None, "error_rtn": errors[0],
                              "error_awq": errors[best]}
    if best == 0:
        return result
    target = _fold_target(group, block)
    if target is None:
        return {**result, "exponent": 0.0, "error_awq": errors[0],
                "reason": "the input comes from no normalisation layer or up_proj to fold the scales into"}
    scales = _scales(magnitude, best / config.grid)
    before = block_output()
    saved = {id(p): p.detach().clone() for p in _touched(group, target)}
    for layer in group.layers:
        layer.weight.mul_(scales.to(layer.weight.dtype))
    _fold(target, scales)
    after = block_output()
    if float((after - before).norm() / before.norm().clamp(min=1e-12)) > _FOLD_TOLERANCE:
        for p in _touched(group, target):
            p.copy_(saved[id(p)])
        return {**result, "exponent": 0.0, "error_awq": errors[0],
                "reason": f"folding into {names.get(target, type(target).__name__)} changed the block's outputs"}
    result["folded_into"] = names.get(target)
    return result


def _scales(magnitude: Tensor, exponent: float) -> Tensor:
    scales = magnitude.pow(exponent).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def _fold_target(group: _Group, block: nn.Module) -> nn.Module | None:
    """The module whose output the scales divide: the producing norm, or a gated FFN's up_proj."""
    width = group.layers[0].in_features
    producer = group.producer
    if producer is not None and not isinstance(producer, nn.Linear):
        weight = getattr(producer, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 1 and weight.numel() == width:
            return producer
        return None
    if producer is None and len(group.layers) == 1:
        for module in block.modules():
            up = getattr(module, "up_proj", None)
            if isinstance(up, nn.Linear) and getattr(module, "down_proj", None) is group.layers[0] \
                    and up.out_features == width:
                return up
    return None


def _touched(group: _Group, target: nn.Module) -> list[Tensor]:
    params = [layer.weight for layer in group.layers] + [target.weight]
    bias = getattr(target, "bias", None)
    return params + ([bias] if isinstance(bias, Tensor) else [])


def _fold(target: nn.Module, scales: Tensor) -> None:
    if isinstance(target, nn.Linear):  # up_proj: its output rows
        target.weight.div_(scales.to(target.weight.dtype).unsqueeze(1))
    else:
        target.weight.div_(scales.to(target.weight.dtype))
    bias = getattr(target, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(scales.to(bias.dtype))


def awq_(
    model: nn.Module,
    config: AWQ,
    calib_inputs: Any,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> QuantizeReport:
    """AWQ: scale the block Linear layers by activation (:func:`awq_scale_`), then quantize every selected layer.

    Args:
        model: a float model with one list of transformer blocks.
        config: an :class:`AWQ`.
        calib_inputs: calibration inputs, as for :func:`~torchslim.quantize.gptq_`.
        filter_fn: ``filter_fn(module, name) -> bool``; layers for which it is false are skipped.

    Returns:
        The :class:`~torchslim.quantize.QuantizeReport` of the quantization; each layer's entry gains ``"awq"``
        (its group's exponent, 0 when left unscaled) and ``"method"``.

    Raises:
        ConfigError, DataError: as :func:`awq_scale_` (nothing is changed).
        ModelError: as the quantization that follows.
    """
    materialize_(model)  # AWQ's search reads every block's weights (a lazily loaded model is read whole)
    scaled = awq_scale_(model, config, calib_inputs, filter_fn=filter_fn)
    exponent = {name: info["exponent"] for key, info in scaled.items() for name in key.split(",")}
    settings = {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
                "scale_dtype": config.scale_dtype}
    if config.then == "gptq":
        report = gptq_(model, GPTQ(**settings), calib_inputs, filter_fn=filter_fn)
    else:
        report = quantize_(model, IntQuant(granularity=config.granularity, **{
            **settings, "group_size": config.group_size or 128}), filter_fn=filter_fn)
    for name, entry in report.quantized.items():
        entry.update(type="awq", awq=exponent.get(name, 0.0), method=entry.get("method", config.then))
    return report


@calibrated_handler(AWQ)
def _awq_handler(model: nn.Module, config: AWQ, calib_inputs: Any, *,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None,
                 overrides: Mapping[str, Config | None] | None = None) -> QuantizeReport:
    """``quantize_(model, AWQ(...), calib_inputs=...)``: :func:`awq_` (which takes no per-layer overrides)."""
    if overrides:
        raise ConfigError(f"overrides = {dict(overrides)!r} is invalid with AWQ: expected none (layers that read one "
                          "input are scaled together; use filter_fn to leave layers out)")
    return awq_(model, config, calib_inputs, filter_fn=filter_fn)

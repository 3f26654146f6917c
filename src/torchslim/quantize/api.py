"""Quantization configs and the in-place verb ``quantize_``.

Each config class has one handler that turns a Linear/Conv module into its compressed layer; the
handlers live in a registry keyed by config type, so a new method is one config + one handler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, ModelError
from torchslim.models.checks import check_finite_weights
from torchslim.onload import materialize_, onloader_of
from torchslim.quantize.affine import GRANULARITIES, ROUNDINGS
from torchslim.quantize.layers import (
    HALF_DTYPES,
    SCALE_DTYPES,
    SUPPORTED_TYPES,
    CodebookLayer,
    HalfLayer,
    IntQuantLayer,
    _WeightOnlyLayer,
    describe_layer,
)
from torchslim.quantize.runtime import set_runtime_


@register_config("int")
@dataclasses.dataclass(frozen=True)
class IntQuant(Config):
    """Weight-only k-bit integer quantization, ``q = clamp(floor(W/scale + B), 0, 2**bits - 1)``.

    Args:
        bits: code width, 2..8.
        granularity: ``"tensor"``, ``"channel"`` (per output channel) or ``"group"`` (groups of
            ``group_size`` along the input dimension of each output channel).
        group_size: elements per group (``"group"`` only).
        symmetric: fixed zero point ``2**(bits-1)`` (no zero points stored) instead of min/max.
        rounding: ``"nearest"`` (``B = zero_point + 0.5``, default) or ``"floor"`` (the seed's
            literal ``floor(W*K + B)`` with ``B = zero_point``; biased low by half a step).
        scale_dtype: storage dtype of the scales.
        pad: pad rows whose input dimension is not a multiple of ``group_size`` (else an error).
        embeddings: also quantize ``nn.Embedding`` tables (one row per token, groups along the width; a lookup
            decodes only the rows it reads). An embedding and a Linear that share one weight (a tied ``lm_head``)
            then share one set of codes, stored once in the ``.slim`` file.
    """

    stage = "quantize"
    stage_default = True
    trains = True  # prepare_qat_ / qat take it

    bits: int = 4
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = False
    rounding: str = "nearest"
    scale_dtype: str = "float16"
    pad: bool = True
    embeddings: bool = False

    def validate(self) -> None:
        self.check_int("bits", 2, 8)
        self.check_choice("granularity", GRANULARITIES)
        self.check_int("group_size", 2)
        self.check_choice("symmetric", (True, False))
        self.check_choice("rounding", ROUNDINGS)
        self.check_choice("scale_dtype", tuple(SCALE_DTYPES))
        self.check_choice("pad", (True, False))
        self.check_choice("embeddings", (True, False))


@register_config("codebook")
@dataclasses.dataclass(frozen=True)
class CodebookQuant(Config):
    """Weight sharing: k-means over each layer's weights into ``2**bits`` shared values.

    Args:
        bits: index width, 2..8 (a codebook of ``2**bits`` float32 values per layer).
        iterations: Lloyd iterations of the 1-D k-means.
    """

    stage = "quantize"

    bits: int = 4
    iterations: int = 30

    def validate(self) -> None:
        self.check_int("bits", 2, 8)
        self.check_int("iterations", 1, 1000)


@register_config("half")
@dataclasses.dataclass(frozen=True)
class HalfPrecision(Config):
    """Half precision (the seed's "half-integer" quantization): weights stored in 16 bits.

    Args:
        dtype: ``"fp16"`` or ``"bf16"``.
    """

    stage = "quantize"
    cli_modes = {"fp16": {"dtype": "fp16"}, "bf16": {"dtype": "bf16"}}

    dtype: str = "fp16"

    def validate(self) -> None:
        self.check_choice("dtype", tuple(HALF_DTYPES))


@dataclasses.dataclass
class QuantizeReport:
    """Which layers were quantized (with their config) and which were skipped (with the reason)."""

    quantized: dict[str, dict] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} layer(s)"]
        lines += [
            f"  {name}: {cfg['type']} {cfg.get('bits', cfg.get('dtype', ''))}" for name, cfg in self.quantized.items()
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} layer(s)")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


_HANDLERS: dict[type[Config], Callable[[nn.Module, Config], nn.Module]] = {}
# model-level handlers of methods that need calibration inputs: fn(model, config, calib_inputs, *, filter_fn,
# overrides) -> QuantizeReport (GPTQ: each layer depends on the layers quantized before it)
_CALIBRATED: dict[type[Config], Callable[..., QuantizeReport]] = {}


def quantization_handler(config_type: type[Config]) -> Callable:
    """Decorator: register ``fn(module, config) -> replacement`` for a config class."""

    def decorate(fn: Callable[[nn.Module, Config], nn.Module]) -> Callable[[nn.Module, Config], nn.Module]:
        _HANDLERS[config_type] = fn
        return fn

    return decorate


def calibrated_handler(config_type: type[Config]) -> Callable:
    """Decorator: register ``fn(model, config, calib_inputs, *, filter_fn, overrides) -> QuantizeReport``.

    For a method that quantizes the whole model from calibration inputs (its config sets
    ``needs_calibration``); :func:`quantize_` calls it when given ``calib_inputs``.
    """

    def decorate(fn: Callable[..., QuantizeReport]) -> Callable[..., QuantizeReport]:
        _CALIBRATED[config_type] = fn
        return fn

    return decorate


def check_layer_config(name: str, chosen: Config, *, calibrated: type[Config] | None = None) -> None:
    """Refuse a layer's config that has no handler (``calibrated``: the one model-level method also accepted).

    Raises:
        ConfigError: naming the layer, the config and the configs allowed.
    """
    if type(chosen) in _HANDLERS or type(chosen) is calibrated:
        return
    if type(chosen) in _CALIBRATED:
        raise ConfigError(
            f"config for layer {name!r} = {type(chosen).__name__} needs calibration inputs, which a per-layer "
            f"override cannot take: expected it as the model's config, quantize_(model, {type(chosen).__name__}"
            "(...), calib_inputs=...), or one of " + ", ".join(c.__name__ for c in _HANDLERS)
        )
    raise ConfigError(
        f"config for layer {name!r} = {type(chosen).__name__} is invalid: expected one of "
        f"{', '.join(c.__name__ for c in [*_HANDLERS, *_CALIBRATED])}"
    )


def nothing_to_quantize(model: nn.Module, report: QuantizeReport, verb: str) -> ModelError:
    """The error for a plan with no layer (an empty report would look like success); the caller raises it."""
    return ModelError(f"{verb} found no layer to quantize in {type(model).__name__}: looked for "
                      f"{', '.join(t.__name__ for t in SUPPORTED_TYPES)} layers; "
                      f"skipped {dict(report.skipped) or 'nothing (no Linear/Conv layers)'}")


@quantization_handler(IntQuant)
def _int_quant(module: nn.Module, config: IntQuant) -> nn.Module:
    return IntQuantLayer.from_float(
        module,
        config.bits,
        config.granularity,
        config.group_size,
        config.symmetric,
        config.rounding,
        config.scale_dtype,
    )


@quantization_handler(CodebookQuant)
def _codebook(module: nn.Module, config: CodebookQuant) -> nn.Module:
    return CodebookLayer.from_float(module, config.bits, config.iterations)


@quantization_handler(HalfPrecision)
def _half(module: nn.Module, config: HalfPrecision) -> nn.Module:
    return HalfLayer.from_float(module, config.dtype)


def quantize_(
    model: nn.Module,
    config: Config,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, Config | None] | None = None,
    calib_inputs: Any = None,
) -> QuantizeReport:
    """Replace the model's Linear/Conv layers by quantized layers, in place.

    Everything is checked before the first layer changes, so an error leaves the model untouched.

    Args:
        model: the model to quantize.
        config: the default config for every layer: ``IntQuant``, ``CodebookQuant``, ``HalfPrecision`` or any
            config with a :func:`quantization_handler`; or a config with a :func:`calibrated_handler` (``GPTQ``),
            which needs ``calib_inputs``.
        filter_fn: ``filter_fn(module, name) -> bool``; layers for which it is false are skipped.
        overrides: per-layer configs by module name; ``None`` skips that layer (mixed precision:
            ``{"0": IntQuant(bits=8), "7": None}``).
        calib_inputs: calibration inputs for a method that needs them (see :func:`~torchslim.quantize.gptq_`);
            refused for the others.

    Returns:
        A :class:`QuantizeReport`; every layer with weights that was not quantized is listed in
        ``skipped`` with the reason.

    Raises:
        ConfigError: an unsupported config type (the default or an override's), calibration inputs missing or
            not wanted, an override naming no layer, or a group size that does not divide a layer's input
            dimension while ``pad`` is off.
        ModelError: a selected layer's weights hold NaN/Inf, or no layer is left to quantize (all skipped).
    """
    calibrated = _CALIBRATED.get(type(config))
    if calibrated is not None:
        if calib_inputs is None:
            raise ConfigError(f"{type(config).__name__} needs calibration inputs: expected quantize_(model, "
                              f"{type(config).__name__}(...), calib_inputs=...) (a batch of inputs, or DataSplits)")
        return calibrated(model, config, calib_inputs, filter_fn=filter_fn, overrides=overrides)
    if calib_inputs is not None:
        raise ConfigError(f"calib_inputs is invalid with {type(config).__name__}: expected None (it quantizes each "
                          "layer from its weights alone)")
    plan, report = plan_layers(model, config, filter_fn=filter_fn, overrides=overrides, check=check_layer_config)
    if not plan:  # as qat does: an empty report would look like success
        raise nothing_to_quantize(model, report, "quantize_")
    tied = _tied_weights(plan)
    plan.reverse()
    first_of: dict[int, nn.Module] = {}
    onloader = onloader_of(model)
    while plan:  # popped, so each float layer is freed once replaced (no second copy of the model builds up)
        name, module, chosen = plan.pop()
        if onloader is not None:  # a lazily loaded model: read the layer's block now (one float block at a time)
            onloader.load_for(module)
        new = _HANDLERS[type(chosen)](module, chosen)
        key = tied.get(name)
        if key is not None and key in first_of:  # the same weight as a layer done before: share its codes
            try:
                new.share_codes_(first_of[key])
            except (AttributeError, ConfigError):  # different configs (overrides) or layer types: kept apart
                pass
        elif key is not None:
            first_of[key] = new
        _replace(model, name, new)
        report.quantized[name] = chosen.to_dict()
    del module
    materialize_(model)  # blocks without a planned layer (a lazily loaded model)
    # run as ts.load would: the same paths, so the saved and the reloaded model compute the same bits
    set_runtime_(model, "auto")
    return report


def plan_layers(
    model: nn.Module,
    config: Config,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, Config | None] | None = None,
    check: Callable[[str, Config], None] | None = None,
) -> tuple[list[tuple[str, nn.Module, Config]], QuantizeReport]:
    """Choose the layers to replace and the config of each, changing nothing (shared by quantize_ and QAT).

    Args:
        model: the model.
        config: default config for every supported layer.
        filter_fn: ``filter_fn(module, name) -> bool``; false skips the layer.
        overrides: per-layer configs by module name; ``None`` skips that layer.
        check: ``check(name, config)`` raising ``ConfigError`` for a config the caller cannot apply.

    Returns:
        ``(plan, report)``: ``(name, module, config)`` triples to apply, and a report whose
        ``skipped`` lists every other layer that has weights, with the reason.

    Raises:
        ConfigError: an override naming no layer, a config ``check`` refuses, or a group size that
            does not divide a layer's input dimension while ``pad`` is off.
        ModelError: a selected layer's weights hold NaN/Inf.
    """
    overrides = dict(overrides or {})
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"overrides names layer {unknown[0]!r}, which the model does not have: "
            f"expected one of {', '.join(n for n in sorted(names) if n)}"
        )
    report = QuantizeReport()
    plan: list[tuple[str, nn.Module, Config]] = []
    # nn.MultiheadAttention reads out_proj.weight/.bias itself, in the input's dtype: a 16-bit weight would not match
    mha_out = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, _WeightOnlyLayer):
            report.skipped[name] = f"already a {type(module).__name__} (quantized or prepared before)"
            continue
        chosen = overrides.get(name, config)
        if isinstance(module, nn.Embedding) and chosen is not None and not getattr(chosen, "embeddings", False):
            report.skipped[name] = (f"{type(module).__name__} kept as is (IntQuant(embeddings=True) quantizes "
                                    "embeddings)")
            continue
        if not isinstance(module, (*SUPPORTED_TYPES, nn.Embedding)):
            if _owns_parameters(module):
                report.skipped[name] = f"{type(module).__name__} is not supported (kept as is)"
            continue
        if chosen is None:
            report.skipped[name] = "override is None"
            continue
        if check is not None:
            check(name, chosen)
        if nn.utils.parametrize.is_parametrized(module, "weight"):
            report.skipped[name] = f"{type(module).__name__} weight is parametrized (e.g. weight_norm): kept as is"
            continue
        if name in mha_out and isinstance(chosen, HalfPrecision):
            report.skipped[name] = ("nn.MultiheadAttention reads its out_proj weight directly, in fp32: a 16-bit "
                                    "weight does not match (kept as is)")
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped[name] = "filter_fn returned False"
            continue
        try:
            describe_layer(module)
        except ConfigError as exc:
            report.skipped[name] = str(exc)
            continue
        _check_groups(name, module, chosen)
        check_finite_weights(module, f"quantize: layer {name!r}", recurse=False, prefix=name)
        plan.append((name, module, chosen))
    return plan, report


def _tied_weights(plan: list[tuple[str, nn.Module, Config]]) -> dict[str, int]:
    """Layer name -> a key shared by the planned layers whose weights are one tensor (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, module, _ in plan:
        if module.weight.device.type != "meta":  # a lazily loaded block's weights are never tied (hf/lazy.py)
            names.setdefault(module.weight.data_ptr(), []).append(name)
    return {name: key for key, group in names.items() if len(group) > 1 for name in group}


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _check_groups(name: str, module: nn.Module, config: Config) -> None:
    if isinstance(config, IntQuant) and config.granularity == "group" and not config.pad:
        fan_in = module.weight[0].numel()
        if fan_in % config.group_size:
            raise ConfigError(
                f"IntQuant.group_size = {config.group_size} is invalid for layer {name!r} with input dimension "
                f"{fan_in}: expected a divisor of {fan_in}, or pad=True"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)  # a replaced layer keeps the mode of the one it replaces
    setattr(parent, child, new)

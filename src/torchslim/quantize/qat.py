"""Quantization-aware training: fake-quantized weights with learned step sizes (LSQ), then packed layers.

``prepare_qat_`` replaces each selected Linear/Conv by a :class:`QATLayer` that keeps the float weight
and fake-quantizes it in every forward with exactly the formula and grouped view of
:mod:`torchslim.quantize.affine`::

    q = clamp(floor(W * K + B), 0, qmax),  K = 1/scale,  B = zero_point (+ 0.5 for nearest)
    W_hat = (q - zero_point) * scale

Rounding uses a straight-through estimator (gradient 1 where the rounded code lies in ``[0, qmax]``,
0 where it is clipped: the formula rounds before it clamps) and the per-(row, group) scales are learned
as in LSQ (Esser et al. 2020, "Learned Step Size Quantization"): with ``v = W/scale`` their gradient is
``round(v) - v`` inside the range and the clipped code ``q - zero_point`` outside, multiplied by
``g = 1/sqrt(elements_per_scale * Qp)`` with ``Qp = 2**(bits-1) - 1``. Zero points stay
fixed at their initial value (asymmetric: from the min/max range; symmetric: ``2**(bits-1)``). The scale is
rounded to its storage dtype (``IntQuant.scale_dtype``) in the forward pass too, straight-through, so
the model trains against the weights it will ship.

Train with :func:`torchslim.train.train` (or :func:`qat`, which does all three steps), then
``convert_`` replaces each ``QATLayer`` by an :class:`~torchslim.quantize.layers.IntQuantLayer` built
from the learned scales: its output equals the fake-quantized one, and it saves as a packed ``.slim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from torchslim import progress as progress_lib
from torchslim.config import Config
from torchslim.errors import ConfigError, ModelError
from torchslim.quantize.affine import compute_qparams, dequantize_affine, grouped_view, qmax_of, quantize_affine
from torchslim.quantize.api import IntQuant, QuantizeReport, _replace, nothing_to_quantize, plan_layers
from torchslim.quantize.layers import (
    SCALE_DTYPES,
    IntQuantLayer,
    _clamp_to_dtype,
    _WeightOnlyLayer,
    describe_layer,
)
from torchslim.quantize.runtime import set_runtime_
from torchslim.train import TrainConfig, train

__all__ = ["SCALE_INITS", "QATLayer", "convert_", "init_qparams", "lsq_grad_scale", "prepare_qat_", "qat"]

SCALE_INITS = ("best", "minmax", "lsq")
# Measured on lenet5/digits (3 fp32 seeds, 6 configs, 3 QAT epochs at adam 1e-4): "minmax" is poor where
# min/max scales are (2-bit symmetric per tensor: 0.26-0.56 at init, 0.947-0.969 after QAT), "lsq" loses a
# test image here and there at 3-4 bits; "best" (per group, the one with the smaller weight error) started
# at or above the better of the two in every case and ended within one test image of the best QAT result.
_DEFAULT_SCALE_INIT = "best"


class _FloorSTE(torch.autograd.Function):
    """``floor`` in the forward pass, identity in the backward pass (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _StorageRoundSTE(torch.autograd.Function):
    """Round scales to their storage dtype (as ``IntQuantLayer`` stores them); identity gradient."""

    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _clamp_to_dtype(scale.to(dtype)).to(scale.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``factor`` (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def lsq_grad_scale(elements_per_scale: int, bits: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(elements_per_scale * Qp)`` with ``Qp = 2**(bits-1) - 1``."""
    return 1.0 / math.sqrt(elements_per_scale * ((1 << (bits - 1)) - 1))


def init_qparams(grouped: torch.Tensor, config: IntQuant, scale_init: str = _DEFAULT_SCALE_INIT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial scales and zero points of a grouped weight, rounded to ``config.scale_dtype``.

    Args:
        grouped: weights shaped ``(rows, groups, group_size)``.
        config: the ``IntQuant`` settings (bits, symmetric, scale_dtype).
        scale_init: ``"minmax"`` (exactly :func:`~torchslim.quantize.affine.compute_qparams`, so the
            QAT model starts as post-training quantization), ``"lsq"`` (``2 * mean|w| / sqrt(Qp)``,
            LSQ's init; asymmetric zero points then centre each group's ``[min, max]``) or ``"best"``
            (per ``(row, group)``, whichever of the two gives the smaller squared weight error).

    Returns:
        ``(scale, zero_point)``, each ``(rows, groups)``: scale float32 (holding ``scale_dtype``
        values), zero point int32.

    Raises:
        ConfigError: an unknown ``scale_init``.
    """
    if scale_init not in SCALE_INITS:
        raise ConfigError(f"scale_init = {scale_init!r} is invalid: expected one of {', '.join(SCALE_INITS)}")
    dtype = SCALE_DTYPES[config.scale_dtype]
    scale, zero_point = compute_qparams(grouped, config.bits, config.symmetric, dtype)
    if scale_init == "minmax":
        return scale.float(), zero_point
    data = grouped.detach().float()
    qp = (1 << (config.bits - 1)) - 1
    lsq = 2 * data.abs().mean(dim=-1) / math.sqrt(qp)
    lsq_scale = _clamp_to_dtype(torch.where(lsq > 0, lsq, torch.ones_like(lsq)).to(dtype))
    lsq_zero_point = zero_point
    if not config.symmetric:
        middle = (data.amin(dim=-1).clamp(max=0) + data.amax(dim=-1).clamp(min=0)) / 2
        centre = qmax_of(config.bits) / 2 - middle / lsq_scale.float()
        lsq_zero_point = torch.round(centre).clamp(0, qmax_of(config.bits)).to(torch.int32)
    if scale_init == "lsq":
        return lsq_scale.float(), lsq_zero_point
    # "best": per (row, group), whichever of the two reconstructs the weights with the smaller squared error
    use_lsq = _squared_error(data, lsq_scale, lsq_zero_point, config) < _squared_error(data, scale, zero_point, config)
    return torch.where(use_lsq, lsq_scale, scale).float(), torch.where(use_lsq, lsq_zero_point, zero_point)


def _squared_error(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, config: IntQuant
                   ) -> torch.Tensor:
    codes = quantize_affine(data, scale, zero_point, config.bits, config.rounding)
    return (dequantize_affine(codes, scale, zero_point) - data).square().sum(dim=-1)


class QATLayer(_WeightOnlyLayer):
    """A Linear/Conv whose float weight is fake-quantized (``IntQuant`` formula) in every forward.

    Parameters: ``weight`` (float, original shape), ``bias`` (if any) and ``scale`` (``(rows, groups)``,
    learned with LSQ's gradient). Buffer: ``zero_point`` (``(rows, groups)``, fixed integers).
    The step size used is ``|scale|`` rounded to ``scale_dtype`` (as ``IntQuantLayer`` stores it), so an
    optimizer step that overshoots zero cannot make it negative.
    """

    def __init__(self, op: str, weight_shape: list[int], bias: bool, conv: dict[str, Any] | None,
                 config: IntQuant) -> None:
        super().__init__(op, weight_shape, bias, conv)
        if not isinstance(config, IntQuant):
            raise ConfigError(f"QATLayer config = {type(config).__name__} is invalid: expected IntQuant")
        self.config = config
        self.weight = nn.Parameter(torch.zeros(self.weight_shape))
        rows, groups, group_len = self._grouped_shape()
        self.elements_per_scale = group_len
        self.scale = nn.Parameter(torch.ones(rows, groups))
        self.register_buffer("zero_point", torch.zeros(rows, groups, dtype=torch.int32))

    def _grouped_shape(self) -> tuple[int, int, int]:
        return tuple(grouped_view(torch.empty(self.weight_shape, device="meta"), self.config.granularity,
                                  self.config.group_size, pad=True).shape)

    @classmethod
    def from_float(cls, module: nn.Module, config: IntQuant,
                   scale_init: str = _DEFAULT_SCALE_INIT) -> QATLayer:
        """Wrap a Linear/Conv module for QAT (weight and bias copied; scales initialised).

        Args:
            module: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``.
            config: the ``IntQuant`` settings to train for.
            scale_init: ``"best"``, ``"minmax"`` or ``"lsq"`` (see :func:`init_qparams`).

        Returns:
            The QAT layer on the module's device.

        Raises:
            ConfigError: unsupported module, or an invalid ``scale_init``.
        """
        layer = cls(**describe_layer(module), config=config)
        weight = module.weight.detach().float()
        scale, zero_point = init_qparams(
            grouped_view(weight, config.granularity, config.group_size, pad=True), config, scale_init)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.scale.copy_(scale)
            layer.zero_point.copy_(zero_point)
            if module.bias is not None:
                layer.bias.copy_(module.bias.detach().float())
        return layer.to(module.weight.device)

    def fake_quant_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``(q - zero_point) * scale`` in the original shape (differentiable).

        Returns:
            A float32 tensor shaped like ``weight``; gradients reach ``weight`` (straight through,
            zero where clipped) and ``scale`` (LSQ).
        """
        cfg = self.config
        grouped = grouped_view(self.weight.float(), cfg.granularity, cfg.group_size, pad=True)
        scale = _GradScale.apply(self.scale, lsq_grad_scale(self.elements_per_scale, cfg.bits)).abs()
        scale = _StorageRoundSTE.apply(scale, SCALE_DTYPES[cfg.scale_dtype]).unsqueeze(-1)
        zero_point = self.zero_point.to(torch.float32).unsqueeze(-1)
        offset = zero_point + (0.5 if cfg.rounding == "nearest" else 0.0)
        codes = _FloorSTE.apply(grouped * (1.0 / scale) + offset).clamp(0, qmax_of(cfg.bits))
        restored = (codes - zero_point) * scale
        rows = self.weight_shape[0]
        return restored.reshape(rows, -1)[:, : self.numel // rows].reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.fake_quant_weight())

    def to_quantized(self) -> IntQuantLayer:
        """The packed :class:`IntQuantLayer` with this layer's learned scales and fixed zero points."""
        cfg = self.config
        return IntQuantLayer.from_qparams(self.to_float(), self.scale.detach().abs(), self.zero_point,
                                          cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric,
                                          cfg.rounding, cfg.scale_dtype)

    def extra_repr(self) -> str:
        cfg = self.config
        group = f", group_size={cfg.group_size}" if cfg.granularity == "group" else ""
        return (f"{super().extra_repr()}, bits={cfg.bits}, granularity={cfg.granularity}{group}, "
                f"symmetric={cfg.symmetric}")


def prepare_qat_(
    model: nn.Module,
    config: IntQuant,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, IntQuant | None] | None = None,
    scale_init: str = _DEFAULT_SCALE_INIT,
) -> QuantizeReport:
    """Replace the model's Linear/Conv layers by :class:`QATLayer`s, in place (selection as in ``quantize_``).

    Everything is checked before the first layer changes, so an error leaves the model untouched.

    Args:
        model: the (usually trained fp32) model.
        config: the ``IntQuant`` settings every selected layer trains for.
        filter_fn: ``filter_fn(module, name) -> bool``; layers for which it is false are skipped.
        overrides: per-layer ``IntQuant`` by module name; ``None`` skips that layer.
        scale_init: ``"best"`` (default: per group, the smaller weight error of the two others),
            ``"minmax"`` (starts exactly at post-training quantization) or ``"lsq"`` (LSQ's
            ``2 * mean|w| / sqrt(Qp)``); see :func:`init_qparams`.

    Returns:
        A :class:`QuantizeReport`: the layers prepared (with their config) and the layers skipped
        (with the reason).

    Raises:
        ConfigError: a config that is not ``IntQuant``, an override naming no layer, an invalid
            ``scale_init``, or a group size that does not divide a layer's input while ``pad`` is off.
    """
    _check_config(config, "config")
    if scale_init not in SCALE_INITS:
        raise ConfigError(f"scale_init = {scale_init!r} is invalid: expected one of {', '.join(SCALE_INITS)}")
    plan, report = plan_layers(model, config, filter_fn=filter_fn, overrides=overrides,
                               check=lambda name, chosen: _check_config(chosen, f"overrides[{name!r}]"))
    for name, module, chosen in plan:
        _replace(model, name, QATLayer.from_float(module, chosen, scale_init))
        report.quantized[name] = chosen.to_dict()
    return report


def convert_(model: nn.Module) -> QuantizeReport:
    """Replace every :class:`QATLayer` by a packed :class:`IntQuantLayer` with its learned scales, in place.

    The converted model computes the same outputs as the QAT model (same codes, same scales), and
    saves as a packed ``.slim`` with :func:`torchslim.save`.

    Args:
        model: a model prepared with :func:`prepare_qat_` (and trained).

    Returns:
        A :class:`QuantizeReport` listing the converted layers with their ``IntQuant`` config.

    Raises:
        ModelError: the model holds no ``QATLayer`` (an error rather than an empty report: converting a
            model that was never prepared is almost certainly a mistake, and would silently ship float
            weights), or the model itself is a bare ``QATLayer`` (use :meth:`QATLayer.to_quantized`).
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, QATLayer)]
    if not layers:
        raise ModelError(f"convert_ found no QATLayer in {type(model).__name__}: "
                         "expected a model prepared with prepare_qat_")
    if isinstance(model, QATLayer):
        raise ModelError("convert_ cannot replace the model itself in place: call model.to_quantized(), "
                         "or wrap the QATLayer in a container")
    report = QuantizeReport()
    for name, layer in layers:
        quantized = layer.to_quantized()
        quantized.train(layer.training)
        _replace(model, name, quantized)
        report.quantized[name] = layer.config.to_dict()
    set_runtime_(model, "auto")  # as ts.load would (see quantize_)
    return report


def qat(
    model: nn.Module,
    train_data: Dataset,
    config: IntQuant,
    train_config: TrainConfig,
    *,
    eval_data: Dataset | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, IntQuant | None] | None = None,
    scale_init: str = _DEFAULT_SCALE_INIT,
    **train_kwargs: Any,
) -> QuantizeReport:
    """Quantization-aware training in one call: ``prepare_qat_``, :func:`torchslim.train.train`, ``convert_``.

    Args:
        model: the model to quantize, in place (usually trained fp32 first).
        train_data: the training dataset of ``(inputs, targets)``.
        config: the ``IntQuant`` settings.
        train_config: the :class:`~torchslim.train.TrainConfig`; QAT from a trained model wants a few
            epochs at a lower learning rate than training from scratch (lenet5/digits: 3 epochs at a tenth
            of the fp32 rate, same augmentation).
        eval_data: scored after every epoch (see the train result's history).
        filter_fn, overrides, scale_init: as in :func:`prepare_qat_`.
        **train_kwargs: passed to :func:`torchslim.train.train` (``checkpoint_path``, ``resume``,
            ``progress``, ``loss_fn``, ``on_epoch_end``). To distill from the fp32 model, pass
            ``loss_fn=torchslim.distill.kd_loss_fn(teacher.eval(), KD())`` with ``teacher`` a frozen copy made
            before ``qat`` (recovery takes a loss, so quantization does not depend on distillation).

    Returns:
        The :class:`QuantizeReport` of ``convert_`` with the layers ``prepare_qat_`` skipped. If training
        raises, the model is left prepared (``QATLayer``s), ready to resume or ``convert_``.

    Raises:
        ConfigError: ``train_config`` is not a ``TrainConfig``, or as in :func:`prepare_qat_` (both before
            the model changes).
        ModelError: no layer was selected for QAT (raised before any training).
    """
    if not isinstance(train_config, TrainConfig):
        raise ConfigError(f"qat train_config = {type(train_config).__name__} is invalid: expected TrainConfig")
    prepared = prepare_qat_(model, config, filter_fn=filter_fn, overrides=overrides, scale_init=scale_init)
    if not prepared.quantized:
        raise nothing_to_quantize(model, prepared, "qat")
    with progress_lib.label("qat"):
        train(model, train_data, train_config, eval_data=eval_data, **train_kwargs)
    report = convert_(model)
    report.skipped.update(prepared.skipped)
    return report


def _check_config(config: Config | None, field: str) -> None:
    if not isinstance(config, IntQuant):
        raise ConfigError(f"QAT {field} = {type(config).__name__} is invalid: expected IntQuant "
                          "(QAT trains k-bit integer weights; apply other configs with quantize_ after)")

"""Synthetic transfer sets for simulated (data-free) distillation: :class:`SyntheticData` and :func:`synthesize`.

Methods:

- ``bn-inversion`` (Yin et al. 2020, DeepInversion): optimise random inputs so that the batch statistics each
  BatchNorm layer of the teacher sees match its running mean and variance, while the teacher classifies them as
  chosen classes (balanced), with total-variation and L2 priors and random jitter. Uses no data at all. The
  inputs can be optimised at a lower resolution and upsampled (``downsample``), a strong smoothness prior.
- ``mixup``: convex mixtures of random pairs of a handful of unlabelled ``source`` samples, shifted and noised.
- ``noise``: the ``source`` samples shifted and noised (or pure standard-normal noise without a source).

Labels are the teacher's arg-max; :func:`torchslim.distill.distill` adds the teacher's logits as soft targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from torchslim import progress as progress_lib
from torchslim._utils import device_of, eval_mode, shift_images
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, ModelError

__all__ = ["METHODS", "PRESETS", "SyntheticData", "shifted_views", "synthesize"]

METHODS = ("bn-inversion", "mixup", "noise")


@register_config("synthetic")
@dataclasses.dataclass(frozen=True)
class SyntheticData(Config):
    """How to make a synthetic transfer set.

    The defaults are the quick settings ``torchslim distill --synthetic`` uses (:data:`PRESETS` ``"quick"``: minutes
    on two CPU cores with the demo's ResNet teacher); :meth:`preset` ``("thorough")`` gives the longer ones (4x the
    images, 2x the steps, full-resolution inversion: ~16x the inversion work).

    Attributes:
        method: ``"bn-inversion"``, ``"mixup"`` or ``"noise"``.
        n: number of synthetic samples (>= 1).
        seed: seed of every random choice (>= 0); the same seed gives the same samples.
        steps: bn-inversion: Adam steps per batch (>= 1).
        lr: bn-inversion: Adam learning rate (> 0), cosine-decayed to 0.
        batch_size: bn-inversion: samples optimised together (>= 2: batch statistics need several).
        bn_weight: bn-inversion: weight of the BatchNorm-statistics loss (>= 0).
        tv_weight: bn-inversion: weight of the total-variation prior (>= 0).
        l2_weight: bn-inversion: weight of the mean squared input (>= 0).
        jitter: bn-inversion: random circular shifts of up to this many pixels each step (>= 0).
        downsample: bn-inversion: optimise images at ``1/downsample`` of the input size, upsampled bilinearly
            (>= 1; 1 optimises every pixel).
        noise_std: mixup/noise: standard deviation of the added Gaussian noise (>= 0).
        max_shift: mixup/noise: random shifts of up to this many pixels (>= 0; images only).
        shift_views: every method: also keep each sample shifted by every whole-pixel offset up to this many pixels
            on both axes (edges replicated), so the set holds ``(2 * shift_views + 1) ** 2`` views per sample, each
            labelled once by the teacher (>= 0; images only; 0 keeps the samples as made). With these views a
            student trains on cached teacher logits instead of the live teacher scoring randomly shifted batches
            every step: the same shifts, the teacher run once per view.
    """

    method: str = "bn-inversion"
    n: int = 512
    seed: int = 0
    steps: int = 100
    lr: float = 0.1
    batch_size: int = 256
    bn_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 1e-4
    jitter: int = 2
    downsample: int = 2
    noise_std: float = 0.2
    max_shift: int = 2
    shift_views: int = 2

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_choice("method", METHODS)
        self.check_int("n", 1)
        self.check_int("seed", 0)
        self.check_int("steps", 1)
        self.check_float("lr", 0, lo_inclusive=False)
        self.check_int("batch_size", 2)
        self.check_float("bn_weight", 0)
        self.check_float("tv_weight", 0)
        self.check_float("l2_weight", 0)
        self.check_int("jitter", 0)
        self.check_int("downsample", 1)
        self.check_float("noise_std", 0)
        self.check_int("max_shift", 0)
        self.check_int("shift_views", 0)

    @classmethod
    def preset(cls, name: str, method: str = "bn-inversion", **changes: Any) -> SyntheticData:
        """The settings of preset ``name`` (:data:`PRESETS`) for ``method``, with ``changes`` on top.

        Args:
            name: ``"quick"`` (the field defaults) or ``"thorough"`` (the longer settings).
            method: the synthesis method.
            **changes: other fields.

        Returns:
            A validated :class:`SyntheticData`.

        Raises:
            ConfigError: an unknown preset, or a bad field value.
        """
        if name not in PRESETS:
            raise ConfigError(f"SyntheticData preset = {name!r} is invalid: expected one of {', '.join(PRESETS)}")
        return cls(method=method, **{**PRESETS[name], **changes})


# "quick" is the field defaults; "thorough" the settings they replaced. Measured on digits with the demo's resnet
# teacher: see docs/design.md (Distillation) and BENCHMARKS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "thorough": {"n": 2048, "steps": 200, "downsample": 1, "shift_views": 0},
}


def synthesize(teacher: nn.Module, config: SyntheticData, *, input_shape: tuple[int, ...],
               source: torch.Tensor | None = None, progress: bool | None = None) -> TensorDataset:
    """Make ``config.n`` synthetic inputs and label them with the teacher's arg-max.

    Args:
        teacher: the trained teacher (its train/eval mode is restored; its weights are not changed).
        config: the :class:`SyntheticData` settings.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        source: ``(k, *input_shape)`` unlabelled samples for ``mixup`` (required, k >= 2) and ``noise``
            (optional); ``bn-inversion`` uses none.
        progress: bn-inversion progress (:mod:`torchslim.progress`: a bar over every step, one line per batch);
            None follows the process setting.

    Returns:
        ``TensorDataset(x float32 (n, *input_shape), y int64 (n,))`` on the CPU; with ``config.shift_views`` = k
        and image inputs, ``(2k + 1)^2 * n`` samples (:func:`shifted_views`).

    Raises:
        ConfigError: not a SyntheticData config; a source with ``bn-inversion``; ``mixup`` without a source.
        DataError: a source whose sample shape differs from ``input_shape`` or holds NaN/Inf.
        ModelError: ``bn-inversion`` with a teacher that has no BatchNorm layer, or a teacher that rejects
            inputs of ``input_shape``.
    """
    return TensorDataset(*_synthesize(teacher, config, input_shape, source, progress)[:2])


def _synthesize(teacher: nn.Module, config: SyntheticData, input_shape: tuple[int, ...], source: Any,
                progress: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, teacher arg-max, teacher logits)``: :func:`synthesize` with the logits (distill caches them)."""
    if not isinstance(config, SyntheticData):
        raise ConfigError(f"synthesize config = {type(config).__name__} is invalid: expected SyntheticData")
    input_shape = tuple(int(d) for d in input_shape)
    if source is not None:
        if config.method == "bn-inversion":
            raise ConfigError("SyntheticData.method = 'bn-inversion' uses no samples: pass source=None "
                              "(or choose method='mixup'/'noise')")
        source = torch.as_tensor(source).detach().float().cpu()
        if tuple(source.shape[1:]) != input_shape:
            raise DataError(f"source samples have shape {tuple(source.shape[1:])}: expected {input_shape}")
        if not bool(torch.isfinite(source).all()):
            raise DataError("source has NaN or Inf values: expected finite samples")
    if config.method == "mixup" and (source is None or source.shape[0] < 2):
        raise ConfigError("SyntheticData.method = 'mixup' needs source: at least 2 unlabelled samples to mix")
    generator = torch.Generator().manual_seed(config.seed)
    with eval_mode(teacher):
        classes = _num_classes(teacher, input_shape)
        if config.method == "bn-inversion":
            x = _bn_inversion(teacher, config, input_shape, classes, generator, progress)
        else:
            x = _augment(config, input_shape, source, generator)
        if config.shift_views and x.ndim == 4:
            x = shifted_views(x, config.shift_views)
        device = device_of(teacher)
        with torch.no_grad():
            logits = torch.cat([teacher(x[i:i + 256].to(device)).float().cpu() for i in range(0, len(x), 256)])
    return x, logits.argmax(dim=1).long(), logits


def shifted_views(x: torch.Tensor, k: int) -> torch.Tensor:
    """Every image of ``x`` shifted by every offset in ``[-k, k]`` on both axes, edges replicated.

    Args:
        x: images ``(N, C, H, W)``.
        k: largest offset in pixels (>= 0).

    Returns:
        ``((2k + 1)^2 * N, C, H, W)``: all N images at the first offset, then all at the next (offset ``(0, 0)`` is
        ``x`` itself).
    """
    if k == 0:
        return x
    return torch.cat([shift_images(x, torch.tensor([[dy, dx]])) for dy in range(-k, k + 1) for dx in range(-k, k + 1)])


def _num_classes(teacher: nn.Module, input_shape: tuple[int, ...]) -> int:
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, *input_shape, device=device_of(teacher)))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"the teacher does not accept inputs of shape {input_shape} ({exc})") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelError(f"the teacher must return (batch, classes) logits, got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random whole-pixel shifts per image, edges replicated (images only)."""
    if max_shift == 0 or x.ndim != 4:
        return x
    offsets = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=generator)
    return shift_images(x, offsets)


def _augment(config: SyntheticData, input_shape: tuple[int, ...], source: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
    n = config.n
    if source is None:  # "noise" without samples: standard-normal inputs
        return torch.randn(n, *input_shape, generator=generator)
    first = torch.randint(0, source.shape[0], (n,), generator=generator)
    x = source[first]
    if config.method == "mixup":
        # A second, different sample for each; lambda ~ U(0, 1), the mixup paper's Beta(1, 1).
        second = (first + torch.randint(1, source.shape[0], (n,), generator=generator)) % source.shape[0]
        lam = torch.rand(n, *([1] * len(input_shape)), generator=generator)
        x = lam * x + (1 - lam) * source[second]
    x = _shift(x, config.max_shift, generator)
    return x + config.noise_std * torch.randn(x.shape, generator=generator)


def _bn_inversion(teacher: nn.Module, config: SyntheticData, input_shape: tuple[int, ...], classes: int,
                  generator: torch.Generator, progress: bool | None = None) -> torch.Tensor:
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats and m.running_mean is not None]
    if not norms:
        raise ModelError(f"SyntheticData.method = 'bn-inversion' needs a teacher with BatchNorm running statistics; "
                         f"{type(teacher).__name__} has none: use method='mixup' or 'noise' with a few samples")
    device = device_of(teacher)
    losses: list[torch.Tensor] = []

    def hook(module, inputs, _output):
        x = inputs[0]
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        losses.append(torch.linalg.vector_norm(mean - module.running_mean)
                      + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_hook(hook) for m in norms]
    image = len(input_shape) == 3
    low = input_shape
    if image and config.downsample > 1:
        low = (input_shape[0],) + tuple(max(1, math.ceil(d / config.downsample)) for d in input_shape[1:])
    batches = []
    total = math.ceil(config.n / config.batch_size)
    try:
        with progress_lib.task("bn-inversion", total * config.steps, progress=progress) as bar:
            for index, start in enumerate(range(0, config.n, config.batch_size)):
                count = max(min(config.batch_size, config.n - start), 2)  # batch statistics need two samples
                targets = (torch.arange(start, start + count) % classes).to(device)
                param = torch.randn(count, *low, generator=generator).to(device).requires_grad_(True)
                shifts = torch.randint(-config.jitter, config.jitter + 1, (config.steps, 2),
                                       generator=generator).tolist()
                loss = _invert_batch(teacher, param, targets, shifts, config, input_shape, low, losses, bar)
                with torch.no_grad():
                    final = _upsample(param, input_shape) if low != input_shape else param
                batches.append(final.detach().cpu()[: min(config.batch_size, config.n - start)])  # drop the extra
                bar.line(f"batch {index + 1}/{total} ({count} images, {config.steps} steps): loss {loss:.4f}")
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(batches)[: config.n].contiguous()


def _invert_batch(teacher: nn.Module, param: torch.Tensor, targets: torch.Tensor, shifts: list[list[int]],
                  config: SyntheticData, input_shape: tuple[int, ...], low: tuple[int, ...],
                  losses: list[torch.Tensor], bar: progress_lib.Task) -> float:
    """Optimise one batch of inputs ``param`` in place for ``config.steps`` Adam steps; the last step's loss."""
    image = len(input_shape) == 3
    optimizer = torch.optim.Adam([param], lr=config.lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    loss = torch.tensor(float("nan"))
    for step in range(config.steps):
        x = _upsample(param, input_shape) if low != input_shape else param
        if image and config.jitter:
            x = torch.roll(x, shifts=tuple(shifts[step]), dims=(2, 3))
        losses.clear()
        out = teacher(x)
        loss = F.cross_entropy(out, targets) + config.bn_weight * torch.stack(losses).sum()
        if image:
            loss = loss + config.tv_weight * _total_variation(x)
        loss = loss + config.l2_weight * x.pow(2).mean()
        (grad,) = torch.autograd.grad(loss, [param])  # gradients of the input only, not the weights
        param.grad = grad
        optimizer.step()
        schedule.step()
        if bar.enabled:  # float() waits for the device; only when someone looks
            bar.advance(info=f"loss {float(loss.detach()):.4f}")
    return float(loss.detach())


def _upsample(param: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(param, size=tuple(input_shape[1:]), mode="bilinear", align_corners=False)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum over the image of squared neighbour differences, averaged over the batch."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (dh + dw).mean()

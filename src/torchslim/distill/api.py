"""Teacher-student distillation through the shared training loop: :class:`KD` and :func:`distill`.

The student trains with :func:`torchslim.train.train` and a loss that calls the teacher (frozen, in eval mode,
under ``torch.no_grad``): Hinton's soft-target loss (:func:`~torchslim.distill.losses.distillation_loss`) plus,
optionally, FitNets feature hints (:mod:`torchslim.distill.features`). Teacher logits can be computed once and
passed to the loss as a third dataset tensor (``KD.cache_logits``), optionally kept on disk across runs
(``cache_dir``), which makes repeated epochs cost only the student's passes. With a
:class:`~torchslim.distill.synthetic.SyntheticData` config instead of data, the student learns from synthetic
inputs only (simulated distillation).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchslim import progress as progress_lib
from torchslim._utils import device_of, eval_mode, first_line, logits_of
from torchslim.config import Config, register_config
from torchslim.data import DataSplits
from torchslim.distill.features import FeatureStudent, align, capture, find_module, make_projection, parse_pairs
from torchslim.distill.losses import FEATURE_LOSSES, distillation_loss, feature_loss
from torchslim.distill.synthetic import SyntheticData, _synthesize
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.fileio import atomic_path
from torchslim.train import TrainConfig, _tensors_of, train

__all__ = ["KD", "distill", "teacher_logits"]

OUTPUT_LOSSES = ("kl", "mse", "cosine")


@register_config("kd")
@dataclasses.dataclass(frozen=True)
class KD(Config):
    """Knowledge distillation settings (Hinton et al. 2015; FitNets hints).

    Attributes:
        temperature: softmax temperature ``T`` of the soft targets (> 0).
        alpha: weight of the soft-target term in ``[0, 1]``; ``1 - alpha`` weighs cross-entropy on the labels.
        features: ``"teacher.module.name:student.module.name"`` pairs whose activations are matched (FitNets),
            through a learned projection when the shapes differ.
        feature_weight: weight of each feature pair's loss (>= 0).
        feature_loss: ``"mse"``, ``"cosine"`` or ``"attention"`` (attention maps; no projection needed).
        cache_logits: compute the teacher's logits once per training sample instead of every step (only for
            un-augmented data, ``augment_shift=0``, and without ``features``).
        output_loss: how the model outputs are compared: ``"kl"`` (Hinton's soft targets; ``(batch, tokens,
            vocab)`` logits per token), ``"mse"`` or ``"cosine"`` (outputs that are not class scores, e.g. the last
            hidden state of a transformer encoder); ``alpha`` weighs it against cross-entropy as for ``"kl"``.
    """

    stage = "distill"
    stage_default = True

    temperature: float = 4.0
    alpha: float = 0.9
    features: tuple[str, ...] = ()
    feature_weight: float = 1.0
    feature_loss: str = "mse"
    cache_logits: bool = False
    output_loss: str = "kl"

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_float("temperature", 0, lo_inclusive=False)
        self.check_float("alpha", 0, 1)
        if not isinstance(self.features, tuple):
            raise self.fail("features", self.features, "a tuple of 'teacher.module:student.module' strings")
        parse_pairs(self.features)
        self.check_float("feature_weight", 0)
        self.check_choice("feature_loss", FEATURE_LOSSES)
        self.check_choice("output_loss", OUTPUT_LOSSES)
        if not isinstance(self.cache_logits, bool):
            raise self.fail("cache_logits", self.cache_logits, "True or False")
        if self.cache_logits and self.features:
            raise self.fail("cache_logits", True, "False when features are matched (the teacher runs every step "
                            "for its activations, so cached logits would save nothing)")


def _as_tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    """The tensors of a dataset: those of a TensorDataset/Subset, or the samples stacked."""
    tensors = _tensors_of(data)
    if tensors is not None:
        return tensors
    items = [data[i] for i in range(len(data))]
    if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
        raise DataError("distill data must yield (inputs, targets) pairs")
    return tuple(torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(2))


def teacher_logits(teacher: nn.Module, inputs: torch.Tensor, *, batch_size: int = 256,
                   cache_dir: str | Path | None = None) -> torch.Tensor:
    """The teacher's logits for every input (eval mode, ``torch.no_grad``), optionally cached on disk.

    The disk cache file is named by a SHA-256 of the teacher's class, state dict and the inputs, so a changed
    teacher or changed data never reads stale logits. Files are safetensors, written atomically.

    Args:
        teacher: the teacher (its train/eval mode is restored).
        inputs: ``(N, ...)`` input tensor.
        batch_size: samples per forward pass.
        cache_dir: directory for the cache file (created if missing), or None for no disk cache.

    Returns:
        A float32 ``(N, classes)`` CPU tensor.
    """
    path = None
    if cache_dir is not None:
        from safetensors.torch import load_file

        directory = Path(cache_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"teacher-logits-{_fingerprint(teacher, inputs)}.safetensors"
        if path.exists():
            cached = load_file(str(path)).get("logits")
            if cached is not None and cached.ndim == 2 and cached.shape[0] == inputs.shape[0]:
                return cached
    device = device_of(teacher)
    with eval_mode(teacher), torch.no_grad():
        chunks = [logits_of(teacher(inputs[i:i + batch_size].to(device)), "teacher_logits").float().cpu()
                  for i in range(0, inputs.shape[0], batch_size)]
    logits = torch.cat(chunks)
    if path is not None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
    return logits


def _fingerprint(teacher: nn.Module, inputs: torch.Tensor) -> str:
    digest = hashlib.sha256(type(teacher).__qualname__.encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(str(tuple(inputs.shape)).encode() + str(inputs.dtype).encode())
    digest.update(inputs.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _check_models(student: nn.Module, teacher: nn.Module) -> None:
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ModelError(f"distill {role} must be a torch.nn.Module, got {type(model).__name__}")
    if student is teacher:
        raise ModelError("distill: the teacher is the student itself; pass a separate (e.g. copy.deepcopy) teacher")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ModelError(f"distill: student and teacher share {len(shared)} parameter tensor(s); the teacher must be "
                         "frozen, so pass a separate copy (copy.deepcopy) of the uncompressed model")


def _check_outputs(student: nn.Module, teacher: nn.Module, sample: torch.Tensor) -> None:
    """Run one sample through both models: the logits must have the same number of classes."""
    widths = []
    for role, model in (("student", student), ("teacher", teacher)):
        try:
            with eval_mode(model), torch.no_grad():
                output = model(sample.to(device_of(model)))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise DataError(f"distill: the {role} does not accept inputs of shape {tuple(sample.shape[1:])} "
                            f"({first_line(exc)})") from exc
        widths.append(tuple(logits_of(output, f"distill: the {role}").shape))
    if widths[0] != widths[1]:
        raise ModelError(f"distill: student logits {widths[0]} and teacher logits {widths[1]} differ; expected the "
                         "same classes")


def _first_sample(data: Dataset) -> torch.Tensor:
    tensors = _tensors_of(data)
    return tensors[0][:1] if tensors is not None else torch.as_tensor(data[0][0]).unsqueeze(0)


def _resolve_data(data: Any, teacher: nn.Module, source: torch.Tensor | None, input_shape: tuple[int, ...] | None,
                  progress: bool | None = None) -> tuple[Dataset, torch.Tensor | None]:
    """(training dataset, teacher logits of a synthetic set or None) from a Dataset, DataSplits, DataLoader or
    SyntheticData."""
    if isinstance(data, SyntheticData):
        if input_shape is None:
            if source is None:
                raise ConfigError("distill with SyntheticData needs the input shape: pass input_shape=(C, H, W) "
                                  "or a source tensor of unlabelled samples")
            input_shape = tuple(source.shape[1:])
        x, y, logits = _synthesize(teacher, data, tuple(input_shape), source, progress)
        return TensorDataset(x, y), logits
    if source is not None:
        raise ConfigError("distill source= is only used with a SyntheticData config; got real data as well")
    if isinstance(data, DataSplits):
        return data.train, None
    if isinstance(data, DataLoader):
        return data.dataset, None
    if isinstance(data, Dataset):
        return data, None
    raise DataError(f"distill data must be a Dataset of (inputs, targets), DataSplits, a DataLoader or a "
                    f"SyntheticData config, got {type(data).__name__}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    config: KD | None = None,
    *,
    train_config: TrainConfig | None = None,
    eval_data: Dataset | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
    source: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Train ``student`` in place to imitate ``teacher`` and return it.

    Args:
        student: any ``nn.Module`` producing ``(batch, classes)`` logits.
        teacher: any ``nn.Module`` with the same classes (other architecture allowed); frozen in eval mode while
            the student trains (its mode is restored afterwards), never updated.
        data: a ``Dataset`` of ``(inputs, targets)`` (also ``DataSplits`` -> its train split, or a ``DataLoader``
            -> its dataset), or a :class:`~torchslim.distill.synthetic.SyntheticData` config: then no real
            training data is used and the student learns from :func:`~torchslim.distill.synthetic.synthesize`'s
            inputs labelled by the teacher.
        config: the :class:`KD` settings (default ``KD()``).
        train_config: the training loop settings (default ``TrainConfig()``).
        eval_data: labelled data scored after each epoch (``DataSplits`` -> its test split).
        checkpoint_path, resume, progress: as in :func:`torchslim.train.train` (``progress`` also covers the
            synthesis of a ``SyntheticData`` set).
        cache_dir: keep cached teacher logits in this directory across runs (needs ``KD.cache_logits``).
        source: a few unlabelled samples ``(k, C, H, W)`` for the ``mixup``/``noise`` synthetic methods.
        input_shape: one sample's shape for synthetic data when no ``source`` is given.

    Returns:
        ``student`` (trained, in eval mode).

    Raises:
        ConfigError: wrong config types; ``cache_logits`` with ``augment_shift`` > 0; ``cache_dir`` without
            ``cache_logits``; a synthetic config without an input shape.
        ModelError: teacher and student are the same module or share parameters; unknown feature module names
            or activations no projection can match; teacher outputs that differ in classes from the student's.
        DataError: as in :func:`torchslim.train.train`.
    """
    config = KD() if config is None else config
    train_config = TrainConfig() if train_config is None else train_config
    if not isinstance(config, KD):
        raise ConfigError(f"distill config = {type(config).__name__} is invalid: expected KD")
    if not isinstance(train_config, TrainConfig):
        raise ConfigError(f"distill train_config = {type(train_config).__name__} is invalid: expected TrainConfig")
    if cache_dir is not None and not config.cache_logits:
        raise ConfigError(f"distill cache_dir = {str(cache_dir)!r} needs KD.cache_logits = True")
    if config.cache_logits and train_config.augment_shift:
        raise ConfigError(
            f"KD.cache_logits = True is invalid with TrainConfig.augment_shift = {train_config.augment_shift}: cached "
            "logits belong to the un-shifted images; set augment_shift=0 or cache_logits=False")
    _check_models(student, teacher)

    if isinstance(eval_data, DataSplits):
        eval_data = eval_data.test
    pairs = parse_pairs(config.features)
    for t_name, s_name in pairs:  # unknown names fail before any work
        find_module(teacher, t_name, "teacher")
        find_module(student, s_name, "student")

    if isinstance(data, SyntheticData):
        shape = tuple(input_shape) if input_shape is not None else None
        if shape is None and source is not None:
            shape = tuple(torch.as_tensor(source).shape[1:])
        if shape is not None:
            _check_outputs(student, teacher, torch.zeros(1, *shape))
    train_data, synthetic_logits = _resolve_data(data, teacher, source, input_shape, progress)
    synthetic = synthetic_logits is not None
    if not synthetic:
        _check_outputs(student, teacher, _first_sample(train_data))
    # Synthetic inputs are fixed, so their logits are cached whenever the loop does not shift them.
    cache = config.cache_logits or (synthetic and not train_config.augment_shift and not pairs)

    with eval_mode(teacher):
        if cache:
            tensors = _as_tensors(train_data)
            if synthetic and cache_dir is None:  # synthesis already ran the teacher on every sample
                logits = synthetic_logits
            else:
                logits = teacher_logits(teacher, tensors[0], cache_dir=cache_dir)
            train_data = TensorDataset(tensors[0], tensors[1], logits)
        model = _with_projections(student, teacher, train_data, pairs, config) if pairs else student
        loss_fn = _make_loss(teacher, config, pairs)
        with progress_lib.label("distill"):
            train(model, train_data, train_config, eval_data=eval_data, loss_fn=loss_fn,
                  checkpoint_path=checkpoint_path, resume=resume, progress=progress)
    return student.eval()


def kd_loss_fn(teacher: nn.Module, config: KD):
    """A ``loss_fn`` for :func:`torchslim.train.train` that distills from ``teacher`` (logit loss only).

    Used by pruning and QAT recovery: the caller keeps the teacher in eval mode.

    Args:
        teacher: the frozen teacher (e.g. the uncompressed model).
        config: a :class:`KD` without ``features``.

    Returns:
        ``loss_fn(model, inputs, targets, *extras)``.

    Raises:
        ConfigError: ``config`` is not a KD, or has ``features`` (those need :func:`distill`).
    """
    if not isinstance(config, KD):
        raise ConfigError(f"kd = {type(config).__name__} is invalid: expected KD")
    if config.features:
        raise ConfigError("KD.features is not supported for recovery fine-tuning: use torchslim.distill.distill")
    return _make_loss(teacher, config, [])


def _make_loss(teacher: nn.Module, config: KD, pairs: list[tuple[str, str]]):
    device = device_of(teacher)
    teacher_names = [t for t, _ in pairs]

    def loss_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *extras: torch.Tensor):
        if extras:
            teacher_out, teacher_feats = extras[0], {}
        else:
            with torch.no_grad(), capture(teacher, teacher_names, "teacher") as teacher_feats:
                teacher_out = logits_of(teacher(inputs.to(device)), "distill: the teacher").to(inputs.device)
        if not pairs:
            student_out = logits_of(model(inputs), "distill: the student")
            return _kd(student_out, teacher_out, targets, config)
        student_net = model.student
        with capture(student_net, [s for _, s in pairs], "student") as student_feats:
            student_out = logits_of(model(inputs), "distill: the student")
        loss = _kd(student_out, teacher_out, targets, config)
        for (t_name, s_name), projection in zip(pairs, model.projections, strict=True):
            s, t = align(student_feats[s_name], teacher_feats[t_name].to(inputs.device))
            loss = loss + config.feature_weight * feature_loss(projection(s), t, config.feature_loss)
        return loss

    return loss_fn


def _kd(student_out: torch.Tensor, teacher_out: torch.Tensor, targets: torch.Tensor, config: KD) -> torch.Tensor:
    if student_out.shape != teacher_out.shape:
        raise ModelError(f"distill: student logits {tuple(student_out.shape)} and teacher logits "
                         f"{tuple(teacher_out.shape)} differ; expected the same classes")
    labels = targets if not targets.is_floating_point() else None
    if config.output_loss != "kl":
        loss = feature_loss(student_out, teacher_out, config.output_loss)
        if config.alpha == 1.0:
            return loss
        if labels is None:
            raise ConfigError(f"KD.alpha = {config.alpha!r} needs labelled targets for its (1 - alpha) cross-entropy "
                              "term: expected alpha = 1.0 for unlabelled data")
        return config.alpha * loss + (1 - config.alpha) * torch.nn.functional.cross_entropy(student_out, labels)
    if student_out.ndim > 2:  # per-token logits (batch, tokens, vocab): one distribution per token
        if labels is not None and labels.shape != student_out.shape[:-1]:
            labels = None
        student_out, teacher_out = student_out.flatten(0, -2), teacher_out.flatten(0, -2)
        labels = None if labels is None else labels.flatten()
    return distillation_loss(student_out, teacher_out, labels, temperature=config.temperature, alpha=config.alpha)


def _with_projections(student: nn.Module, teacher: nn.Module, data: Dataset, pairs: list[tuple[str, str]],
                      config: KD) -> FeatureStudent:
    """Probe one batch to learn each pair's activation shapes and build the projections."""
    tensors = _tensors_of(data)
    count = min(2, len(data))
    sample = tensors[0][:2] if tensors is not None else torch.stack([torch.as_tensor(data[i][0]) for i in range(count)])
    with eval_mode(student), torch.no_grad():
        with capture(teacher, [t for t, _ in pairs], "teacher") as t_feats:
            teacher(sample.to(device_of(teacher)))
        with capture(student, [s for _, s in pairs], "student") as s_feats:
            student(sample.to(device_of(student)))
    projections = []
    for t_name, s_name in pairs:
        s, t = align(s_feats[s_name], t_feats[t_name])
        projection = make_projection(s, t, config.feature_loss, f"{t_name}:{s_name}")
        projections.append(projection.to(device_of(student)))
    return FeatureStudent(student, projections, pairs)

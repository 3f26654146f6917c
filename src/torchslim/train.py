"""THE training loop: train, fine-tune after pruning, QAT and distillation all run through :func:`train`.

One loop, with the pieces every stage needs: validated inputs (empty data, labels outside the model's
outputs and NaN/Inf inputs fail before any work), a ``loss_fn`` hook (distillation plugs its teacher in
there), per-epoch evaluation, progress when asked (:mod:`torchslim.progress`), and atomic checkpoints that
resume bit-for-bit: a run killed at any step and resumed gives the same parameters as one that was never
interrupted (same seed, CPU).

Determinism: ``torch.manual_seed(config.seed)`` at the start; the shuffle order of epoch ``e`` comes from
its own generator seeded with ``seed * 1000003 + e``, so a resumed run regenerates the order and skips
the steps already done; the global torch RNG (dropout) is saved in the checkpoint and restored.

Data parallel: launched by ``torchrun`` (``WORLD_SIZE > 1``) or inside an initialised process group, the loop
joins the group (gloo for a CPU model, NCCL for a CUDA one; :mod:`torchslim.distributed`), wraps the model in
DistributedDataParallel and gives each rank ``order[rank::world]`` of the epoch's shuffled order, padded by
repeating its start to a multiple of ``world`` (DistributedSampler semantics). ``batch_size`` is per rank, so
N ranks with batch B step like one process with batch N * B on the same samples. Metrics are summed over
ranks; rank 0 alone writes checkpoints (with every rank's RNG state).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset, TensorDataset

from torchslim import distributed
from torchslim import progress as progress_lib
from torchslim._callable_module import make_module_callable
from torchslim._utils import device_of
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError, DataError, ModelError, TorchSlimError
from torchslim.fileio import atomic_path

__all__ = [
    "RECOMMENDED",
    "LossFn",
    "TrainConfig",
    "TrainResult",
    "default_loss",
    "evaluate",
    "random_shift",
    "recommended_config",
    "set_seed",
    "train",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

_SHUFFLE_MULTIPLIER = 1000003
# Rank r > 0 seeds its RNG (dropout, augmentation) with seed + r * _RANK_SEED_STRIDE; rank 0 keeps ``seed``.
_RANK_SEED_STRIDE = 1 << 32
# Config fields that may differ between a checkpoint and the run resuming it (they do not change the
# math of the steps already taken): epochs may grow, checkpoints may be written more or less often.
_RESUMABLE_CHANGES = ("epochs", "checkpoint_every")


@register_config("train")
@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Settings of :func:`train`.

    Attributes:
        epochs: passes over the training data (>= 1).
        batch_size: samples per optimizer step (>= 1); the last batch of an epoch may be smaller.
        lr: learning rate (> 0).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum in [0, 1) (ignored by Adam/AdamW).
        weight_decay: L2 (Adam, SGD) or decoupled (AdamW) weight decay (>= 0).
        scheduler: ``"none"``, ``"cosine"`` (to 0 over ``epochs``) or ``"step"`` (times ``gamma`` every
            ``step_size`` epochs); both step once per epoch.
        step_size: epochs between ``"step"`` decays (>= 1).
        gamma: ``"step"`` decay factor in (0, 1].
        seed: seed of the torch RNG and of the per-epoch shuffle order (>= 0).
        checkpoint_every: write a checkpoint every this many optimizer steps (>= 0); 0 writes one only at
            each epoch end. Only used when ``train`` gets a ``checkpoint_path``.
        max_grad_norm: clip the global gradient norm to this value (> 0), or None for no clipping.
        augment_shift: shift each training image by a random whole number of pixels in
            ``[-augment_shift, augment_shift]`` on both axes (edges replicated) before the loss; 0 (the
            default) trains on the data as given. Needs image inputs (N, C, H, W).
    """

    stage = "finetune"
    stage_default = True

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    checkpoint_every: int = 0
    max_grad_norm: float | None = None
    augment_shift: int = 0

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_int("epochs", 1)
        self.check_int("batch_size", 1)
        self.check_float("lr", 0, lo_inclusive=False)
        self.check_choice("optimizer", ("adam", "adamw", "sgd"))
        self.check_float("momentum", 0, 1, hi_inclusive=False)
        self.check_float("weight_decay", 0)
        self.check_choice("scheduler", ("none", "cosine", "step"))
        self.check_int("step_size", 1)
        self.check_float("gamma", 0, 1, lo_inclusive=False)
        self.check_int("seed", 0)
        self.check_int("checkpoint_every", 0)
        if self.max_grad_norm is not None:
            self.check_float("max_grad_norm", 0, lo_inclusive=False)
        self.check_int("augment_shift", 0)


# Settings used by ``torchslim train`` for the reference models on the embedded digits data (1437 train /
# 360 test images, 28x28). Test accuracy over init/shuffle seeds 0-4 (0-2 for resnet) and time per run
# on 2 CPU cores (torch 2.13): lenet5 98.6-99.7% in ~2.4 s; lenet300 98.3-99.2% in ~0.8 s; resnet
# 99.7-100% in ~9 s; student_cnn 99.4-100% in ~1.1 s; student_mlp 97.8-98.9% in ~0.4 s. Without the
# +-2 pixel shifts the small models plateau near 97% (lenet5 96.9-97.5%): the same 8 test digits are
# missed by every model.
RECOMMENDED: dict[str, TrainConfig] = {
    "lenet5": TrainConfig(epochs=15, batch_size=64, lr=1e-3, scheduler="cosine", augment_shift=2),
    "lenet300": TrainConfig(epochs=30, batch_size=64, lr=1e-3, scheduler="cosine", augment_shift=2),
    "resnet": TrainConfig(epochs=4, batch_size=64, lr=1e-3, scheduler="cosine", augment_shift=2),
    "student_cnn": TrainConfig(epochs=20, batch_size=64, lr=3e-3, scheduler="cosine", augment_shift=2),
    "student_mlp": TrainConfig(epochs=30, batch_size=64, lr=3e-3, scheduler="cosine", augment_shift=2),
}


def recommended_config(model_name: str) -> TrainConfig:
    """Return the recommended :class:`TrainConfig` for a registered model name (defaults otherwise).

    Args:
        model_name: ``lenet5``, ``torchslim.models:lenet5`` or any other spec.

    Returns:
        The entry of :data:`RECOMMENDED`, or ``TrainConfig()`` for models without one.
    """
    name = model_name.rpartition(":")[2] if model_name.startswith("torchslim.models:") else model_name
    return RECOMMENDED.get(name, TrainConfig())


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        history: one dict per epoch: ``epoch`` (1-based), ``train_loss`` (mean over samples),
            ``train_accuracy`` (None when the loss function's model output could not be scored),
            ``eval_accuracy`` (None without ``eval_data``), ``lr`` (used during the epoch), ``seconds``.
        final_accuracy: ``eval_accuracy`` of the last epoch, or None without ``eval_data``.
        steps: total optimizer steps, including those done before a resume.
        resumed_from: global step the run resumed from, or None for a fresh run.
    """

    history: list[dict[str, Any]]
    final_accuracy: float | None
    steps: int
    resumed_from: int | None = None


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA).

    Args:
        seed: a non-negative integer.
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    torch.manual_seed(seed)


def default_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against class-index ``targets`` (the default ``loss_fn``)."""
    return F.cross_entropy(model(inputs), targets)


# --- data helpers ------------------------------------------------------------------------------------
def _tensors_of(data: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors behind a TensorDataset (or a Subset of one), or None for other datasets."""
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, Subset):
        inner = _tensors_of(data.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(list(data.indices), dtype=torch.long)
        return tuple(t[index] for t in inner)
    return None


def _length(data: Any, name: str) -> int:
    try:
        return len(data)
    except TypeError as exc:
        kind = type(data).__name__
        raise DataError(f"{name} must be a map-style Dataset with a length, got {kind}") from exc


def _loader(data: Dataset, batch_size: int, order: list[int] | None = None) -> DataLoader:
    """A single-process loader over ``order`` (default: dataset order), without touching the global RNG."""
    indices = order if order is not None else list(range(len(data)))
    # A DataLoader draws a base seed from the global RNG unless given its own generator.
    generator = torch.Generator().manual_seed(0)
    if isinstance(data, TensorDataset):
        # One indexing op per batch instead of per sample + collate.
        sampler = BatchSampler(indices, batch_size, drop_last=False)
        return DataLoader(data, sampler=sampler, batch_size=None, generator=generator)
    return DataLoader(data, sampler=indices, batch_size=batch_size, shuffle=False, generator=generator)


def _split_batch(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets, _extras = _split_batch_extras(batch, name)
    return inputs, targets


def _split_batch_extras(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """``(inputs, targets, extras)`` of one batch; extras are further per-sample tensors (e.g. cached logits)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataError(f"{name} must yield (inputs, targets) pairs, got {type(batch).__name__}")
    return batch[0], batch[1], tuple(batch[2:])


def _output_width(model: nn.Module, sample: torch.Tensor, name: str) -> int | None:
    """Number of classes the model predicts, from one sample in eval mode (train/eval mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(sample[:1].to(device_of(model)))
    except (RuntimeError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name}: the model does not accept inputs of shape {tuple(sample.shape[1:])} ({first_line}); "
            "expected the input shape the model was built for"
        ) from exc
    finally:
        model.train(was_training)
    if isinstance(output, torch.Tensor) and output.ndim == 2:
        return int(output.shape[1])
    return None


def _check_inputs(inputs: torch.Tensor, name: str, offset: int = 0) -> None:
    if inputs.is_floating_point() or inputs.is_complex():
        finite = torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0]) + offset
            raise DataError(
                f"{name} has NaN or Inf inputs (first at sample {bad}); expected finite values: "
                "clean or re-normalise the data"
            )


def _check_labels(labels: torch.Tensor, classes: int | None, name: str) -> None:
    if classes is None or labels.is_floating_point() or labels.is_complex() or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise DataError(
            f"{name} has label {bad} but the model outputs {classes} classes: "
            f"expected labels in [0, {classes})"
        )


def _first_input(data: Dataset) -> torch.Tensor:
    tensors = _tensors_of(data)
    return tensors[0][0] if tensors is not None else _split_batch(data[0], "train_data")[0]


def _check_data(data: Dataset, name: str, model: nn.Module | None) -> tuple[int, int | None]:
    """Validate a dataset up front; return (length, number of model outputs or None)."""
    length = _length(data, name)
    if length == 0:
        raise DataError(f"{name} is empty: expected at least one (input, target) sample")
    tensors = _tensors_of(data)
    if tensors is not None and len(tensors) < 2:
        raise DataError(f"{name} must hold (inputs, targets) tensors, got {len(tensors)} tensor(s)")
    classes = None
    if model is not None:
        sample = tensors[0][:1] if tensors is not None else _split_batch(data[0], name)[0].unsqueeze(0)
        classes = _output_width(model, sample, name)
    if tensors is not None:
        _check_inputs(tensors[0], name)
        _check_labels(tensors[1], classes, name)
    return length, classes


# --- optimizer and scheduler -------------------------------------------------------------------------
def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return None


# --- checkpoints -------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only=True: a checkpoint is tensors and plain data; never unpickle arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TorchSlimError(
            f"cannot resume from checkpoint {str(path)!r}: it is not a torchslim checkpoint of tensors and "
            f"plain data (loaded with weights_only=True; {detail}). Remove it or pass resume=False with "
            "another path"
        ) from exc
    required = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "history", "rng", "config")
    missing = [key for key in required if not (isinstance(state, dict) and key in state)]
    if missing:
        raise TorchSlimError(
            f"cannot resume from checkpoint {str(path)!r}: missing {', '.join(missing)}; "
            "expected a checkpoint written by torchslim.train"
        )
    return state


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    for key in sorted(set(saved) | set(current)):
        if key in _RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            raise TorchSlimError(
                f"cannot resume from checkpoint {str(path)!r}: TrainConfig.{key} = {current.get(key)!r} but "
                f"the checkpoint was written with {key} = {saved.get(key)!r}; use the same settings "
                "(only epochs may grow) or start a new run"
            )
    if config.epochs < int(saved.get("epochs", 0)):
        raise TorchSlimError(
            f"cannot resume from checkpoint {str(path)!r}: TrainConfig.epochs = {config.epochs} is less than "
            f"the checkpoint's epochs = {saved['epochs']}; epochs may only grow on resume"
        )


# --- progress ----------------------------------------------------------------------------------------
def _progress_task(progress: bool | None, epochs: int, steps_per_epoch: int, start_epoch: int,
                   skip_steps: int) -> progress_lib.Task:
    """The run's progress: one bar over every step (ETA of the whole run), or one line per epoch."""
    done = start_epoch * steps_per_epoch + skip_steps  # a resumed run's steps count as done, not in the rate
    return progress_lib.task(progress_lib.default_label("train"), epochs * steps_per_epoch, progress=progress,
                             done=done)


def _epoch_summary(record: dict[str, Any], epochs: int) -> str:
    parts = [f"loss {record['train_loss']:.4f}"]
    if record["train_accuracy"] is not None:
        parts.append(f"train acc {record['train_accuracy']:.2%}")
    if record["eval_accuracy"] is not None:
        parts.append(f"eval acc {record['eval_accuracy']:.2%}")
    return f"epoch {record['epoch']}/{epochs}: " + ", ".join(parts)


# --- validation: every input checked before any work ---------------------------------------------------------
def _check_arguments(model: nn.Module, config: TrainConfig | None, loss_fn: LossFn | None
                     ) -> tuple[TrainConfig, list[nn.Parameter]]:
    """The config (default ``TrainConfig()``) and the trainable parameters, after checking the arguments.

    Raises:
        ConfigError: ``config`` is not a TrainConfig, or ``loss_fn`` is not callable.
        ModelError: the model has no trainable parameters.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(model, inputs, targets), got {loss_fn!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"{type(model).__name__} has no trainable parameters: nothing to train")
    return config, params


def _check_datasets(model: nn.Module, train_data: Dataset, eval_data: Dataset | None,
                    config: TrainConfig) -> tuple[int, int | None]:
    """Check the training (and evaluation) data against the model and the config.

    Returns:
        ``(number of training samples, number of model outputs or None)``.

    Raises:
        DataError: empty data, NaN/Inf inputs, labels outside the outputs, inputs the model does not accept, or
            ``augment_shift`` on data that is not images.
    """
    num_samples, classes = _check_data(train_data, "train_data", model)
    if config.augment_shift:
        sample = _first_input(train_data)
        if sample.ndim != 3:
            raise DataError(
                f"TrainConfig.augment_shift = {config.augment_shift} needs image inputs (C, H, W) per "
                f"sample, got shape {tuple(sample.shape)}; set augment_shift=0 for this data"
            )
    if eval_data is not None:
        _check_data(eval_data, "eval_data", model)
    return num_samples, classes


def _check_checkpoint_path(checkpoint_path: str | os.PathLike | None, resume: bool) -> Path | None:
    """The checkpoint path as a ``Path`` (None without one), refusing to overwrite a checkpoint unless resuming.

    Raises:
        TorchSlimError: the directory does not exist, or the file exists and ``resume`` is false.
    """
    if checkpoint_path is None:
        return None
    path = Path(checkpoint_path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise TorchSlimError(f"checkpoint_path {str(path)!r}: directory {str(directory)!r} does not exist")
    if path.exists() and not resume:
        raise TorchSlimError(
            f"checkpoint {str(path)!r} already exists: pass resume=True to continue from it, "
            "or remove it (or choose another path) to start over"
        )
    return path


# --- the loop ----------------------------------------------------------------------------------------
def _zero_running() -> dict[str, Any]:
    """Running sums of one epoch: loss times samples, samples, and correct/scored samples for the accuracy."""
    return {"loss_sum": 0.0, "correct": 0, "scored": 0, "count": 0}


@dataclasses.dataclass
class _Loop:
    """The state of one :func:`train` run: what is fixed at the start, and what a checkpoint saves and restores.

    Attributes:
        model: the model being trained (``net`` is it, or its DistributedDataParallel wrapper while running).
        used: samples of this rank's shard used per epoch (a lone last sample is dropped for BatchNorm).
        running: the current epoch's running sums (:func:`_zero_running`).
        captured: the last model output, kept by a forward hook to score training accuracy without a second forward.
    """

    model: nn.Module
    params: list[nn.Parameter]
    config: TrainConfig
    train_data: Dataset
    loss_fn: LossFn
    path: Path | None
    num_samples: int
    classes: int | None
    tensor_data: bool
    device: torch.device
    world: int
    rank: int
    used: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    net: nn.Module | None = None
    start_epoch: int = 0
    skip_steps: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    running: dict[str, Any] = dataclasses.field(default_factory=_zero_running)
    resumed_from: int | None = None
    captured: list[Any] = dataclasses.field(default_factory=lambda: [None])

    @classmethod
    def start(cls, model: nn.Module, params: list[nn.Parameter], train_data: Dataset, config: TrainConfig, *,
              loss_fn: LossFn, path: Path | None, num_samples: int, classes: int | None) -> _Loop:
        """Join torchrun's process group if any, size the epochs, seed the RNG, build optimizer and scheduler.

        Raises:
            TorchSlimError: torchrun's process group cannot be set up.
        """
        device = device_of(model)
        joined = distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
        world = distributed.world_size() if joined else 1
        rank = distributed.rank() if world > 1 else 0
        local_samples = math.ceil(num_samples / world)  # this rank's shard (padded, as DistributedSampler does)
        # BatchNorm cannot train on a batch of one sample: drop such a last batch (one sample an epoch).
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        lone_last = has_batchnorm and local_samples > 1 and local_samples % config.batch_size == 1
        used = local_samples - 1 if lone_last else local_samples
        set_seed(config.seed)
        if rank:
            torch.manual_seed(config.seed + rank * _RANK_SEED_STRIDE)  # own dropout/augmentation draws per rank
        optimizer = _make_optimizer(params, config)
        return cls(model=model, params=params, config=config, train_data=train_data, loss_fn=loss_fn, path=path,
                   num_samples=num_samples, classes=classes, tensor_data=_tensors_of(train_data) is not None,
                   device=device, world=world, rank=rank, used=used,
                   steps_per_epoch=math.ceil(used / config.batch_size), optimizer=optimizer,
                   scheduler=_make_scheduler(optimizer, config))

    # --- resume and checkpoints ---
    def resume(self, path: Path) -> None:
        """Restore the model, optimizer, scheduler, RNG, position and history from the checkpoint at ``path``.

        Raises:
            TorchSlimError: not a torchslim checkpoint, written with other settings or by another number of
                processes, or not matching this model or optimizer.
        """
        state = _load_checkpoint(path)
        _check_resume_config(state["config"], self.config, path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            raise TorchSlimError(
                f"cannot resume from checkpoint {str(path)!r}: it was written by {saved_world} process(es) but "
                f"this run has {self.world}, so the data shards differ; resume with the same number of processes "
                f"(torchrun --nproc_per_node {saved_world}, or no torchrun for 1)"
            )
        ranks = state.get("ranks")
        own = ranks[self.rank] if ranks else {"rng": state["rng"], "running": state.get("running")}
        self._load_states(state, path)
        torch.set_rng_state(own["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.start_epoch, self.skip_steps = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = [dict(record) for record in state["history"]]
        if self.skip_steps and own.get("running"):
            self.running = dict(own["running"])
        self.resumed_from = self.global_step

    def _load_states(self, state: dict[str, Any], path: Path) -> None:
        """Load the checkpoint's model, optimizer and scheduler states (a cosine schedule follows grown epochs)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
                if self.config.scheduler == "cosine":
                    self.scheduler.T_max = self.config.epochs  # epochs may have grown
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TorchSlimError(
                f"cannot resume from checkpoint {str(path)!r}: it does not match this model or optimizer ({exc})"
            ) from exc

    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        """Write a checkpoint (rank 0 only, with every rank's RNG and running sums) when a path was given."""
        if self.path is None:
            return
        ranks = None
        if self.world > 1:  # every rank's RNG and running sums, so a resumed run continues each rank exactly
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, {"rng": torch.get_rng_state(), "running": dict(self.running)})
            if self.rank:
                return
        _save_checkpoint(
            self.path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "history": [dict(record) for record in self.history],
                "running": dict(self.running),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "config": self.config.to_dict(),
                "world_size": self.world,
                "ranks": ranks,
            },
        )

    # --- running ---
    def run(self, eval_data: Dataset | None, progress: bool | None,
            on_epoch_end: Callable[[dict[str, Any]], Any] | None) -> None:
        """Train the remaining epochs; the model is a plain module in eval mode afterwards, even on an error."""
        # The DDP wrapper averages gradients across ranks in backward; it shares the model's parameters.
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)
        # The hook sits on the inner model, which the DDP wrapper calls.
        hook = self.model.register_forward_hook(lambda _module, _inputs, output: self.captured.__setitem__(0, output))
        config = self.config
        try:
            with _progress_task(progress, config.epochs, self.steps_per_epoch, self.start_epoch,
                                self.skip_steps) as bar:
                for epoch in range(self.start_epoch, config.epochs):
                    started = time.perf_counter()
                    lr = self.run_epoch(epoch, bar)
                    record = self.epoch_record(epoch, lr, started, eval_data)
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.checkpoint(epoch + 1, 0)
                    if bar.enabled:
                        # the last epoch's line also stays above a terminal's bar, which is gone when the run ends
                        bar.line(_epoch_summary(record, config.epochs), also_bar=epoch + 1 == config.epochs)
                    if on_epoch_end is not None:
                        on_epoch_end(dict(record))
        finally:
            hook.remove()
            self.net = None  # drops DDP's gradient hooks from the parameters
            self.model.eval()

    def run_epoch(self, epoch: int, bar: progress_lib.Task) -> float:
        """The optimizer steps of one epoch (those after ``skip_steps`` on the first epoch of a resumed run).

        Returns:
            The learning rate used during the epoch.
        """
        config = self.config
        self.net.train()
        order = _shard(_epoch_order(self.num_samples, config.seed, epoch), self.rank, self.world)
        done = self.skip_steps
        self.skip_steps = 0
        bar.update(description=f"{bar.description} epoch {epoch + 1}/{config.epochs}")
        lr = self.optimizer.param_groups[0]["lr"]
        remaining = order[done * config.batch_size:self.used]
        for inputs, targets, extras in _batches(self.train_data, remaining, config.batch_size):
            value = self.step(inputs, targets, extras, where=(epoch, done, lr))
            done += 1
            self.global_step += 1
            bar.advance(info=f"loss {value:.4f}")
            if config.checkpoint_every and self.global_step % config.checkpoint_every == 0:
                if done < self.steps_per_epoch:  # the epoch end writes one anyway
                    self.checkpoint(epoch, done)
        return lr

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, extras: tuple[Any, ...], *,
             where: tuple[int, int, float]) -> float:
        """One optimizer step on one batch; add it to the running sums.

        Args:
            where: ``(epoch, step in epoch, lr)``, for the divergence message.

        Returns:
            The batch's loss (all ranks' sum when one rank's is not finite).
        """
        config, device = self.config, self.device
        if not self.tensor_data:
            _check_inputs(inputs, "train_data")
            _check_labels(targets, self.classes, "train_data")
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        extras = tuple(e.to(device, non_blocking=True) if torch.is_tensor(e) else e for e in extras)
        if config.augment_shift:
            inputs = random_shift(inputs, config.augment_shift)
        self.captured[0] = None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net, inputs, targets, *extras)
        value = self._finite_loss(loss, where)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        batch = int(targets.shape[0])
        self.running["loss_sum"] += value * batch
        self.running["count"] += batch
        correct = _count_correct(self.captured[0], targets)
        if correct is not None:
            self.running["correct"] += correct
            self.running["scored"] += batch
        return value

    def _finite_loss(self, loss: Any, where: tuple[int, int, float]) -> float:
        """The loss as a float, checked to be a finite scalar on every rank.

        Raises:
            TorchSlimError: ``loss`` is not a scalar tensor, or it (or another rank's) is NaN/Inf.
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TorchSlimError(f"loss_fn must return a scalar tensor, got {shape}")
        value = float(loss.detach())
        if self.world > 1:  # every rank stops together when any rank diverges (none is left waiting)
            total = distributed.all_reduce_sum([value], self.device)[0]
            if math.isfinite(value) and not math.isfinite(total):
                value = total
        if not math.isfinite(value):
            epoch, done, lr = where
            raise TorchSlimError(
                f"the loss became {value} at epoch {epoch + 1}, step {done + 1} (global step "
                f"{self.global_step + 1}): training diverged; lower the learning rate (lr = {lr:g}) "
                "or set max_grad_norm"
            )
        return value

    def epoch_record(self, epoch: int, lr: float, started: float, eval_data: Dataset | None) -> dict[str, Any]:
        """Close an epoch: sum the running sums over ranks, evaluate, append the history record, reset the sums.

        Returns:
            The epoch's record (see :class:`TrainResult`).
        """
        running = self.running
        if self.world > 1:
            keys = ("loss_sum", "count", "correct", "scored")
            totals = distributed.all_reduce_sum([running[k] for k in keys], self.device)
            running = {k: (v if k == "loss_sum" else int(v)) for k, v in zip(keys, totals, strict=True)}
        record = {
            "epoch": epoch + 1,
            "train_loss": running["loss_sum"] / max(running["count"], 1),
            "train_accuracy": running["correct"] / running["scored"] if running["scored"] else None,
            "eval_accuracy": None if eval_data is None else evaluate(self.model, eval_data),
            "lr": float(lr),
            "seconds": time.perf_counter() - started,
        }
        self.history.append(record)
        self.running = _zero_running()
        return record


def train(
    model: nn.Module,
    train_data: Dataset,
    config: TrainConfig | None = None,
    *,
    eval_data: Dataset | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch_end: Callable[[dict[str, Any]], Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_data``.

    Args:
        model: the model to train (on its own device); left in eval mode at the end.
        train_data: a map-style dataset of ``(inputs, targets)``; a ``TensorDataset`` (or a ``Subset`` of
            one) is checked up front for NaN/Inf inputs and labels outside the model's outputs, other
            datasets batch by batch. Reshuffled every epoch; for a model with BatchNorm, a last batch of
            a single sample is skipped (BatchNorm cannot train on it).
        config: a :class:`TrainConfig` (defaults to ``TrainConfig()``).
        eval_data: a dataset scored with :func:`evaluate` after every epoch.
        loss_fn: ``loss_fn(model, inputs, targets, *extras) -> scalar tensor`` (extras: the dataset's
            further per-sample tensors, e.g. cached teacher logits; none for pairs); default cross-entropy of
            ``model(inputs)``. Distillation passes a loss that also calls its teacher. The training
            accuracy is scored from the last ``model(...)`` output the loss computed.
        checkpoint_path: write a checkpoint here (atomically) every ``config.checkpoint_every`` steps and
            at each epoch end; the file is left in place at the end. An existing file is never
            overwritten unless ``resume`` is true.
        resume: continue from ``checkpoint_path`` when it exists (start fresh when it does not). The
            config must match the checkpoint's, except that ``epochs`` may grow and
            ``checkpoint_every`` may change.
        progress: report progress on stderr (:mod:`torchslim.progress`: a bar with ETA on a terminal, one line
            per epoch otherwise); None follows the process setting (off unless the CLI or
            ``torchslim.progress.configure`` turned it on), False never.
        on_epoch_end: called with each epoch's history dict after the epoch's checkpoint is written.

    Under torchrun (``WORLD_SIZE > 1``) every rank must call ``train`` with the same arguments; see the
    module doc. ``loss_fn`` then receives the DistributedDataParallel wrapper (call it like the model, so
    gradients are averaged across ranks); progress shows on rank 0 only; ``on_epoch_end`` runs on every
    rank with the same (rank-summed) record.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: ``config`` is not a TrainConfig.
        DataError: empty data, NaN/Inf inputs, labels outside ``[0, outputs)``, or inputs the model
            does not accept.
        ModelError: the model has no trainable parameters.
        TorchSlimError: the loss became NaN/Inf (on any rank), the checkpoint cannot be used to resume
            (also: written by another number of processes), or torchrun's process group cannot be set up.
    """
    config, params = _check_arguments(model, config, loss_fn)
    num_samples, classes = _check_datasets(model, train_data, eval_data, config)
    path = _check_checkpoint_path(checkpoint_path, resume)
    loop = _Loop.start(model, params, train_data, config, loss_fn=loss_fn or default_loss, path=path,
                       num_samples=num_samples, classes=classes)
    if path is not None and resume and path.exists():
        loop.resume(path)
    loop.run(eval_data, progress, on_epoch_end)
    final = loop.history[-1]["eval_accuracy"] if loop.history else None
    return TrainResult(history=loop.history, final_accuracy=final, steps=loop.global_step,
                       resumed_from=loop.resumed_from)


def _epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The shuffle order of ``epoch``: a function of (seed, epoch) only, so a resumed run regenerates it."""
    generator = torch.Generator().manual_seed(seed * _SHUFFLE_MULTIPLIER + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def _shard(order: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s part of an epoch order: ``order`` padded by repeating its start to a multiple of ``world``,
    then every ``world``-th index from ``rank`` (torch's DistributedSampler with ``drop_last=False``)."""
    if world == 1:
        return order
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[rank:total:world]


def _batches(data: Dataset, order: list[int], batch_size: int):
    for batch in _loader(data, batch_size, order):
        yield _split_batch_extras(batch, "train_data")


def random_shift(inputs: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image of a batch by its own random whole-pixel offset (edges replicated).

    Offsets are drawn from the global torch RNG (saved in checkpoints), so runs are reproducible.

    Args:
        inputs: images of shape (N, C, H, W).
        max_shift: largest offset in pixels on each axis (>= 0).

    Returns:
        A new tensor of the same shape and dtype (``inputs`` itself when ``max_shift`` is 0).
    """
    if max_shift == 0:
        return inputs
    n, _, h, w = inputs.shape
    offsets = torch.randint(-max_shift, max_shift + 1, (n, 2)).to(inputs.device)
    padded = F.pad(inputs, (max_shift,) * 4, mode="replicate")
    rows = torch.arange(h, device=inputs.device) + max_shift - offsets[:, :1]  # (n, h)
    cols = torch.arange(w, device=inputs.device) + max_shift - offsets[:, 1:]  # (n, w)
    batch = torch.arange(n, device=inputs.device)[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] -> (n, h, w, c) -> (n, c, h, w)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()


def _count_correct(output: Any, targets: torch.Tensor) -> int | None:
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or targets.ndim != 1:
        return None
    if output.shape[0] != targets.shape[0] or targets.is_floating_point():
        return None
    return int((output.detach().argmax(dim=1) == targets).sum())


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data``.

    Runs in eval mode under ``torch.inference_mode`` and restores the model's train/eval mode.

    Args:
        model: a classifier returning logits of shape (batch, classes).
        data: a map-style dataset of ``(inputs, label)`` with integer labels.
        batch_size: samples per forward pass (>= 1).

    Returns:
        The fraction of samples whose arg-max logit equals the label, in [0, 1].

    Raises:
        DataError: if ``data`` is empty or the model output is not (batch, classes) logits.
        ConfigError: if ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluate batch_size = {batch_size!r} is invalid: expected an integer >= 1")
    from torchslim.measure.accuracy import accuracy

    return accuracy(model, data, batch_size)


# ``ts.train(...)`` must call the function even after ``import torchslim.train`` bound the module.
make_module_callable(__name__, "train")

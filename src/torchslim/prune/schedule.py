"""Pruning schedules with recovery: one-shot, iterative (Han et al. 2015) and gradual (Zhu & Gupta 2017).

Every schedule alternates pruning with fine-tuning through the shared loop :func:`torchslim.train.train`.
Masks stay attached while training (``torch.nn.utils.prune`` multiplies the weight by its mask in every
forward pass, so pruned weights stay exactly zero and get no update); :func:`finalize_` makes the result
permanent at the end. Later pruning steps score the current effective weights, so they only remove more:
a weight pruned at step k stays pruned.

Fine-tuning uses the training loop's default cross-entropy, or the ``loss_fn`` given, e.g. the distillation loss
:func:`torchslim.distill.kd_loss_fn` of a copy of the unpruned model (recovery by distillation; the caller builds
it, so pruning does not depend on distillation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.config import Config, register_config
from torchslim.data import DataSplits
from torchslim.errors import ConfigError, DataError
from torchslim.prune.api import MagnitudePruning, NMSparsity, PruneReport, finalize_, layer_sparsity, prune_
from torchslim.train import TrainConfig, evaluate, train

KINDS = ("oneshot", "iterative", "gradual")


@register_config("prune-schedule")
@dataclasses.dataclass(frozen=True)
class PruneSchedule(Config):
    """How pruning and fine-tuning alternate.

    Args:
        kind: ``"oneshot"`` (prune once, then fine-tune), ``"iterative"`` (``steps`` rounds of prune +
            fine-tune, Han et al. 2015: each round removes the same fraction of the weights still left, the
            last round reaches the config's ``amount``; threshold rules are re-applied each round with the same
            tau) or ``"gradual"`` (Zhu & Gupta 2017: the sparsity follows
            ``s_t = s_f + (s_i - s_f) * (1 - t / steps) ** 3`` for ``t = 1 .. steps``, ending at ``s_f``).
        steps: pruning steps (>= 1; exactly 1 for ``"oneshot"``).
        epochs_per_step: training epochs after each pruning step but the last (>= 0).
        finetune_epochs: training epochs after the last pruning step (>= 0; the recovery phase).
        initial_sparsity: ``s_i`` of the gradual schedule, in ``[0, 1)`` and below the final amount (only
            with ``kind="gradual"``).
    """

    kind: str = "oneshot"
    steps: int = 1
    epochs_per_step: int = 1
    finetune_epochs: int = 3
    initial_sparsity: float = 0.0

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_choice("kind", KINDS)
        self.check_int("steps", 1)
        if self.kind == "oneshot" and self.steps != 1:
            raise self.fail("steps", self.steps, "1 when kind='oneshot' (use kind='iterative' or 'gradual' for more)")
        self.check_int("epochs_per_step", 0)
        self.check_int("finetune_epochs", 0)
        self.check_float("initial_sparsity", 0.0, 1.0, hi_inclusive=False)
        if self.kind != "gradual" and self.initial_sparsity != 0.0:
            raise self.fail("initial_sparsity", self.initial_sparsity, "0.0 unless kind='gradual'")

    def epochs_after(self, step: int) -> int:
        """Training epochs after pruning step ``step`` (1-based)."""
        return self.finetune_epochs if step == self.steps else self.epochs_per_step


def polynomial_sparsity(final: float, steps: int, initial: float = 0.0, power: int = 3) -> list[float]:
    """Zhu & Gupta (2017) targets ``s_t = s_f + (s_i - s_f) * (1 - t / n) ** power`` for ``t = 1 .. n``.

    Args:
        final: ``s_f``, the sparsity reached at the last step.
        steps: ``n``, the number of pruning steps (>= 1).
        initial: ``s_i``, the sparsity the schedule starts from (reached at ``t = 0``, not a step).
        power: the decay exponent (3 in the paper).

    Returns:
        ``n`` non-decreasing targets; the last is exactly ``final``.
    """
    targets = [final + (initial - final) * (1.0 - t / steps) ** power for t in range(1, steps)]
    return targets + [final]


def iterative_sparsity(final: float, steps: int) -> list[float]:
    """Targets of iterative pruning: each round removes the same fraction of the weights still left.

    Args:
        final: the sparsity after the last round, in ``[0, 1)``.
        steps: rounds (>= 1).

    Returns:
        ``1 - (1 - final) ** (k / steps)`` for ``k = 1 .. steps``; the last is exactly ``final``.
    """
    return [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps)] + [final]


@dataclasses.dataclass
class ScheduleResult:
    """What :func:`prune_with_schedule` did.

    Attributes:
        history: one dict per pruning step: ``step`` (1-based), ``target_sparsity`` (None for threshold
            rules), ``achieved_sparsity`` (zeros / elements of the pruned layers after that step's training),
            ``threshold`` (tau of the step, when the rule has one), ``accuracy_pruned`` (right after pruning),
            ``accuracy`` (after the step's training; both None without ``eval_data``), ``epochs``.
        report: the last step's :class:`PruneReport`, its layer table recomputed on the finalized weights.
        train_history: the training loop's per-epoch records of every step, in order (with a ``step`` key).
    """

    history: list[dict[str, Any]]
    report: PruneReport
    train_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Final sparsity of the pruned layers."""
        return self.report.sparsity

    @property
    def accuracy(self) -> float | None:
        """Accuracy after the last step (None without ``eval_data``)."""
        return self.history[-1]["accuracy"] if self.history else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"history": [dict(h) for h in self.history], "report": self.report.to_dict(),
                "train_history": [dict(h) for h in self.train_history], "sparsity": self.sparsity,
                "accuracy": self.accuracy}


def schedule_targets(config: MagnitudePruning | NMSparsity, schedule: PruneSchedule) -> list[float | None]:
    """The target sparsity of each step (None where the rule is a threshold or a fixed pattern).

    Args:
        config: the pruning config whose ``amount`` (if any) is the final target.
        schedule: the schedule.

    Returns:
        One entry per step.

    Raises:
        ConfigError: the schedule cannot drive this config (see :func:`prune_with_schedule`).
    """
    if not isinstance(config, (MagnitudePruning, NMSparsity)):
        raise ConfigError(f"config = {type(config).__name__} is invalid for prune_with_schedule: expected "
                          "MagnitudePruning or NMSparsity (ChannelPruning: prune_ then train)")
    if isinstance(config, NMSparsity):
        if schedule.kind != "oneshot":
            raise ConfigError(f"PruneSchedule.kind = {schedule.kind!r} is invalid for NMSparsity: an N:M pattern is "
                              "fixed in one step (fine-tuning cannot change it); expected kind='oneshot'")
        return [None]
    amount = config.amount
    if schedule.kind == "gradual":
        if amount is None:
            rule = "threshold" if config.threshold is not None else "std_multiplier"
            raise ConfigError(f"PruneSchedule.kind = 'gradual' is invalid with MagnitudePruning.{rule}: the gradual "
                              "schedule raises the sparsity step by step to a target, so it needs amount=...; use "
                              "kind='iterative' to re-apply a threshold rule")
        if schedule.initial_sparsity >= amount:
            raise ConfigError(f"PruneSchedule.initial_sparsity = {schedule.initial_sparsity!r} is invalid: expected "
                              f"a value below the final sparsity MagnitudePruning.amount = {amount!r}")
        return polynomial_sparsity(amount, schedule.steps, schedule.initial_sparsity)
    if amount is None:
        return [None] * schedule.steps
    if schedule.kind == "iterative":
        return iterative_sparsity(amount, schedule.steps)
    return [amount]


def prune_with_schedule(
    model: nn.Module,
    config: MagnitudePruning | NMSparsity,
    schedule: PruneSchedule,
    train_data: Any,
    *,
    train_config: TrainConfig,
    eval_data: Any = None,
    progress: bool | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    loss_fn: Callable | None = None,
) -> ScheduleResult:
    """Prune ``model`` in place following ``schedule``, fine-tuning between steps, then finalize.

    Args:
        model: the (trained) model.
        config: ``MagnitudePruning`` (amount, threshold or std_multiplier) or ``NMSparsity`` (oneshot only).
            With ``amount`` the final sparsity is exactly ``amount`` (per the config's scope).
        schedule: a :class:`PruneSchedule`.
        train_data: labelled training data (a ``Dataset``, or ``DataSplits`` for its train split); also the
            data of the ``taylor`` criterion.
        train_config: optimizer, learning rate, batch size ... of the fine-tuning; its ``epochs`` is replaced by
            the schedule's, and step ``k`` trains with ``seed + k - 1``.
        eval_data: labelled data for the accuracies of the history (``DataSplits`` -> test split).
        progress: progress bars of the training loop (None: only on a terminal).
        filter_fn: ``filter_fn(module, name) -> bool``, passed to :func:`prune_`.
        loss_fn: ``loss_fn(model, inputs, targets)`` of the fine-tuning; None trains with cross-entropy. To
            distill from the unpruned model: ``torchslim.distill.kd_loss_fn(teacher.eval(), KD())`` with
            ``teacher`` a frozen copy made before pruning.

    Returns:
        A :class:`ScheduleResult`. The model is finalized (no masks), in eval mode.

    Raises:
        ConfigError: a gradual schedule with a threshold rule, an initial sparsity not below the final one, an
            N:M config with more than one step, or a config type the schedule cannot drive.
        DataError: fine-tuning epochs without ``train_data``; ``taylor`` without data.
    """
    targets = schedule_targets(config, schedule)
    if train_data is None and any(schedule.epochs_after(step) for step in range(1, schedule.steps + 1)):
        raise DataError("prune_with_schedule: the schedule fine-tunes (epochs_per_step/finetune_epochs > 0) but "
                        "train_data is None: expected labelled training data, or a schedule with 0 epochs")

    if isinstance(train_data, DataSplits):
        train_data = train_data.train
    if isinstance(eval_data, DataSplits):
        eval_data = eval_data.test
    history: list[dict[str, Any]] = []
    train_history: list[dict[str, Any]] = []
    report = None
    for step, target in enumerate(targets, start=1):
        step_config = config if target is None or target == config.amount else config.replace(amount=target)
        report = prune_(model, step_config, data=train_data, filter_fn=filter_fn)
        accuracy_pruned = evaluate(model, eval_data) if eval_data is not None else None
        epochs = schedule.epochs_after(step)
        accuracy = accuracy_pruned
        if epochs:
            run = train(model, train_data, train_config.replace(epochs=epochs, seed=train_config.seed + step - 1),
                        eval_data=eval_data, progress=progress, loss_fn=loss_fn)
            train_history += [{"step": step, **record} for record in run.history]
            accuracy = run.final_accuracy
        history.append({
            "step": step,
            "target_sparsity": target,
            "achieved_sparsity": _sparsity(model, report.layers),
            "threshold": report.threshold,
            "accuracy_pruned": accuracy_pruned,
            "accuracy": accuracy,
            "epochs": epochs,
        })
    finalize_(model)
    model.eval()
    table = layer_sparsity(model)
    report.layers = {name: {"shape": row["shape"], **table[name]} for name, row in report.layers.items()}
    return ScheduleResult(history=history, report=report, train_history=train_history)


def _sparsity(model: nn.Module, layers: dict[str, Any]) -> float:
    table = layer_sparsity(model)
    numel = sum(table[name]["numel"] for name in layers)
    return sum(table[name]["zeros"] for name in layers) / numel if numel else 0.0

"""Distillation losses: Hinton's soft-target loss and feature (hint) losses.

``distillation_loss`` is Hinton, Vinyals & Dean (2015)::

    alpha * T**2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * cross_entropy(z_s, y)

The ``T**2`` keeps the soft-target gradients at the same scale as the hard-target ones when ``T`` changes.
Feature losses compare one teacher activation with one (projected) student activation of the same shape:
``mse``, ``cosine`` (1 - cosine similarity per sample) or ``attention`` (Zagoruyko & Komodakis 2017: the
L2-normalised map of squared activations summed over channels, compared with MSE; it needs no projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchslim.errors import ConfigError, DataError

FEATURE_LOSSES = ("mse", "cosine", "attention")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton's knowledge-distillation loss (mean over the batch).

    Args:
        student_logits: ``(batch, classes)`` logits of the student (gradients flow through these).
        teacher_logits: ``(batch, classes)`` logits of the teacher (treated as constants).
        targets: ``(batch,)`` class indices for the hard-label term, or None (then ``alpha`` must be 1).
        temperature: softmax temperature ``T`` (> 0).
        alpha: weight of the soft-target term in ``[0, 1]``; ``1 - alpha`` weighs the cross-entropy.

    Returns:
        A scalar tensor.

    Raises:
        ConfigError: ``temperature`` <= 0, ``alpha`` outside ``[0, 1]``, or no targets with ``alpha < 1``.
        DataError: the logits' shapes differ or are not ``(batch, classes)``.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature = {temperature!r} is invalid: expected a number > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha = {alpha!r} is invalid: expected a number in [0, 1]")
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise DataError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "both be (batch, classes) with the same number of classes"
        )
    teacher = teacher_logits.detach().float()
    soft = torch.zeros((), device=student_logits.device)
    if alpha > 0:
        log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
        soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        return alpha * soft
    if targets is None:
        raise ConfigError(f"alpha = {alpha!r} needs labelled targets for its (1 - alpha) cross-entropy term")
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' activation-based attention: ``normalize(sum_c f**2)`` per sample.

    Args:
        features: ``(N, C, H, W)`` conv features, ``(N, L, D)`` token hidden states or ``(N, D)`` vectors.

    Returns:
        ``(N, H*W)`` (conv), ``(N, L)`` (tokens) or ``(N, D)`` (vectors), each row L2-normalised.
    """
    f = features.float()
    if f.ndim == 4:
        energy = f.pow(2).sum(dim=1).flatten(1)
    elif f.ndim == 3:
        energy = f.pow(2).sum(dim=2)
    else:
        energy = f.pow(2).flatten(1)
    return F.normalize(energy, dim=1)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between a (projected) student activation and a teacher activation.

    Args:
        student: student activation, already projected to the teacher's shape (except for ``attention``,
            which only needs the same spatial/token size).
        teacher: teacher activation (treated as a constant).
        kind: ``"mse"``, ``"cosine"`` (mean of ``1 - cos`` over samples) or ``"attention"``.

    Returns:
        A scalar tensor.

    Raises:
        ConfigError: an unknown ``kind``.
        DataError: shapes that cannot be compared.
    """
    if kind not in FEATURE_LOSSES:
        raise ConfigError(f"feature_loss = {kind!r} is invalid: expected one of {', '.join(FEATURE_LOSSES)}")
    teacher = teacher.detach().float()
    if kind == "attention":
        s, t = attention_map(student), attention_map(teacher)
        if s.shape != t.shape:
            raise DataError(f"attention maps differ in size: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        return (s - t).pow(2).sum(dim=1).mean()
    if student.shape != teacher.shape:
        raise DataError(f"feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if kind == "mse":
        return F.mse_loss(student.float(), teacher)
    return (1 - F.cosine_similarity(student.float().flatten(1), teacher.flatten(1), dim=1)).mean()

"""Distillation as recovery: pruning schedules and QAT fine-tune against the uncompressed model as teacher."""

import copy

import pytest
import torch
from torch.utils.data import Subset

from torchslim.distill import KD
from torchslim.distill.api import kd_loss_fn
from torchslim.prune import MagnitudePruning
from torchslim.prune.schedule import PruneSchedule, prune_with_schedule
from torchslim.quantize import IntQuant
from torchslim.quantize.qat import qat
from torchslim.train import TrainConfig, evaluate


def _count_calls(model):
    calls = []
    return calls, model.register_forward_hook(lambda *args: calls.append(1))


def test_pruning_recovers_with_the_unpruned_teacher(trained_lenet5, digits):
    data = Subset(digits.train, range(512))
    config = TrainConfig(epochs=1, lr=1e-3)
    schedule = PruneSchedule(finetune_epochs=2)
    plain = copy.deepcopy(trained_lenet5)
    prune_with_schedule(plain, MagnitudePruning(amount=0.97), schedule, data, train_config=config, progress=False)
    teacher = copy.deepcopy(trained_lenet5)
    calls, handle = _count_calls(teacher)
    student = copy.deepcopy(trained_lenet5)
    result = prune_with_schedule(student, MagnitudePruning(amount=0.97), schedule, data, train_config=config,
                                 eval_data=digits.test, progress=False,
                                 loss_fn=kd_loss_fn(teacher.eval(), KD(alpha=1.0)))
    handle.remove()
    assert len(calls) == 2 * 8  # the teacher ran on every fine-tuning batch (512 / 64 per epoch)
    assert result.sparsity == pytest.approx(0.97, abs=0.01)
    # a different loss gave different weights; alpha=1 used no labels and still recovered accuracy
    # (measured: 76.9% after 2 epochs on 512 images at 97% sparsity)
    assert not torch.equal(plain[5].weight, student[5].weight)
    step = result.history[-1]
    assert step["accuracy"] > step["accuracy_pruned"] and evaluate(student, digits.test) > 0.7
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), trained_lenet5.parameters(), strict=True))


def test_qat_distills_from_the_fp32_teacher(trained_lenet5, digits):
    data = Subset(digits.train, range(256))
    config = TrainConfig(epochs=1, lr=1e-4)
    teacher = copy.deepcopy(trained_lenet5)
    calls, handle = _count_calls(teacher)
    plain, student = copy.deepcopy(trained_lenet5), copy.deepcopy(trained_lenet5)
    qat(plain, data, IntQuant(bits=3), config, progress=False)
    qat(student, data, IntQuant(bits=3), config, progress=False,
        loss_fn=kd_loss_fn(teacher.eval(), KD(temperature=2.0)))
    handle.remove()
    assert len(calls) == 4
    assert not torch.equal(plain[5].packed, student[5].packed) or not torch.equal(plain[5].scale, student[5].scale)
    assert evaluate(student, digits.test) > 0.9

"""Pruning schedules: the math, exact final sparsity, zeros kept through fine-tuning, and the issue's acceptance."""

import copy
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.config import Config
from torchslim.errors import ConfigError, DataError
from torchslim.prune import MagnitudePruning, NMSparsity, layer_sparsity
from torchslim.prune import schedule as schedule_module
from torchslim.prune.schedule import (
    PruneSchedule,
    iterative_sparsity,
    polynomial_sparsity,
    prune_with_schedule,
    schedule_targets,
)
from torchslim.quantize import IntQuant, quantize_
from torchslim.train import RECOMMENDED, evaluate

FAST = RECOMMENDED["lenet5"].replace(epochs=1)


@pytest.fixture(scope="module")
def data(digits):
    return digits


@pytest.fixture(scope="module")
def trained(trained_lenet5):
    return trained_lenet5


def pruned_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# --- the math --------------------------------------------------------------------------------------------------
def test_polynomial_decay_matches_zhu_and_gupta():
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3, t = 1..n
    assert polynomial_sparsity(0.9, 4) == pytest.approx([0.5203125, 0.7875, 0.8859375, 0.9])
    assert polynomial_sparsity(0.9, 4, initial=0.5) == pytest.approx([0.73125, 0.85, 0.89375, 0.9])
    assert polynomial_sparsity(0.8, 1) == [0.8]
    targets = polynomial_sparsity(0.95, 10, initial=0.1)
    assert targets[-1] == 0.95 and all(a < b for a, b in zip(targets, targets[1:], strict=False))
    steps = [b - a for a, b in zip([0.1, *targets], targets, strict=False)]
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))  # prune fast first, then slowly


def test_iterative_rounds_remove_the_same_fraction_of_what_is_left():
    targets = iterative_sparsity(0.9, 3)
    assert targets[-1] == 0.9
    left = [1 - s for s in [0.0, *targets]]
    ratios = [b / a for a, b in zip(left, left[1:], strict=False)]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)
    assert iterative_sparsity(0.5, 1) == [0.5]


def test_schedule_targets_per_kind():
    config = MagnitudePruning(amount=0.9)
    assert schedule_targets(config, PruneSchedule()) == [0.9]
    assert schedule_targets(config, PruneSchedule(kind="iterative", steps=2)) == pytest.approx([1 - 0.1**0.5, 0.9])
    gradual = schedule_targets(config, PruneSchedule(kind="gradual", steps=4))
    assert gradual == pytest.approx([0.5203125, 0.7875, 0.8859375, 0.9])
    assert schedule_targets(MagnitudePruning(threshold=0.05), PruneSchedule(kind="iterative", steps=3)) == [None] * 3
    assert schedule_targets(NMSparsity(), PruneSchedule()) == [None]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "cubic"}, "PruneSchedule.kind = 'cubic'"),
        ({"kind": "iterative", "steps": 0}, "PruneSchedule.steps = 0"),
        ({"steps": 3}, "PruneSchedule.steps = 3 is invalid: expected 1 when kind='oneshot'"),
        ({"epochs_per_step": -1}, "PruneSchedule.epochs_per_step = -1"),
        ({"finetune_epochs": 1.5}, "PruneSchedule.finetune_epochs = 1.5"),
        ({"kind": "gradual", "initial_sparsity": 1.0}, "PruneSchedule.initial_sparsity = 1.0"),
        ({"kind": "iterative", "initial_sparsity": 0.2}, "expected 0.0 unless kind='gradual'"),
    ],
)
def test_schedule_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        PruneSchedule(**kwargs)


def test_schedule_round_trips_through_the_config_registry():
    config = PruneSchedule(kind="gradual", steps=5, epochs_per_step=2, finetune_epochs=4, initial_sparsity=0.25)
    data = config.to_dict()
    assert data["type"] == "prune-schedule"
    assert Config.from_dict(data) == config


@pytest.mark.parametrize(
    ("config", "schedule", "message"),
    [
        (MagnitudePruning(threshold=0.05), PruneSchedule(kind="gradual", steps=3), "gradual' is invalid with "
         "MagnitudePruning.threshold: the gradual schedule raises the sparsity step by step to a target, so it needs "
         "amount"),
        (MagnitudePruning(scope="neuron", std_multiplier=1.0), PruneSchedule(kind="gradual", steps=2),
         "MagnitudePruning.std_multiplier"),
        (MagnitudePruning(amount=0.5), PruneSchedule(kind="gradual", steps=2, initial_sparsity=0.5),
         "initial_sparsity = 0.5 is invalid: expected a value below the final sparsity"),
        (NMSparsity(), PruneSchedule(kind="iterative", steps=2), "N:M pattern is fixed in one step"),
        (IntQuant(), PruneSchedule(), "expected MagnitudePruning or NMSparsity"),
    ],
)
def test_schedules_refuse_what_they_cannot_drive_before_touching_the_model(trained, data, config, schedule, message):
    model = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        prune_with_schedule(model, config, schedule, data, train_config=FAST)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fine_tuning_without_training_data_fails_before_pruning(trained):
    model = copy.deepcopy(trained)
    with pytest.raises(DataError, match="train_data is None"):
        prune_with_schedule(model, MagnitudePruning(amount=0.5), PruneSchedule(finetune_epochs=1), None,
                            train_config=FAST)
    assert not hasattr(model[5], "weight_mask")
    result = prune_with_schedule(model, MagnitudePruning(amount=0.5), PruneSchedule(finetune_epochs=0), None,
                                 train_config=FAST)
    assert result.sparsity == pytest.approx(0.5, abs=1e-6) and result.train_history == []


# --- behaviour -------------------------------------------------------------------------------------------------
def _watch_training(monkeypatch):
    """Wrap the training loop: before each run record the masks, after it check pruned weights are still 0."""
    runs = []
    real_train = schedule_module.train

    def spy(model, train_data, config, **kwargs):
        masks = {n: m.weight_mask.clone() for n, m in pruned_layers(model).items()}
        kept_before = {n: m.weight.detach()[masks[n].bool()].clone() for n, m in pruned_layers(model).items()}
        result = real_train(model, train_data, config, **kwargs)
        for name, module in pruned_layers(model).items():
            assert torch.equal(module.weight_mask, masks[name]), name
            weight = module.weight.detach()
            assert bool((weight[~masks[name].bool()] == 0).all()), f"{name}: a pruned weight moved during training"
            runs.append(not torch.equal(weight[masks[name].bool()], kept_before[name]))
        return result

    monkeypatch.setattr(schedule_module, "train", spy)
    return runs


@pytest.mark.parametrize(
    ("scope", "kind", "steps"),
    [("global", "iterative", 3), ("global", "gradual", 3), ("layer", "gradual", 2), ("neuron", "iterative", 2)],
)
def test_schedules_reach_the_target_exactly_and_zeros_stay_zero_through_fine_tuning(
    trained, data, monkeypatch, scope, kind, steps
):
    runs = _watch_training(monkeypatch)
    model = copy.deepcopy(trained)
    amount = 0.8
    schedule = PruneSchedule(kind=kind, steps=steps, epochs_per_step=1, finetune_epochs=1)
    result = prune_with_schedule(model, MagnitudePruning(scope=scope, amount=amount), schedule, data,
                                 train_config=FAST, eval_data=data, progress=False)
    assert runs and all(runs)  # every run trained (kept weights moved) while pruned ones stayed at zero
    assert len(result.train_history) == steps and [r["step"] for r in result.train_history] == list(range(1, steps + 1))
    targets = schedule_targets(MagnitudePruning(amount=amount), schedule)
    assert [h["target_sparsity"] for h in result.history] == targets
    achieved = [h["achieved_sparsity"] for h in result.history]
    assert all(a < b for a, b in zip(achieved, achieved[1:], strict=False))
    for h in result.history:
        assert h["achieved_sparsity"] == pytest.approx(h["target_sparsity"], abs=1e-3)  # per-row rounding
        assert 0 <= h["accuracy_pruned"] <= 1 and 0 <= h["accuracy"] <= 1
    # finalized: no masks, and the count of zeros is exactly what the amount asks for, at the config's scope
    layers = pruned_layers(model)
    assert not any(hasattr(m, "weight_mask") for m in layers.values())
    if scope == "global":
        total = sum(m.weight.numel() for m in layers.values())
        assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(amount * total)
    elif scope == "layer":
        for module in layers.values():
            assert int((module.weight == 0).sum()) == round(amount * module.weight.numel())
    else:
        for module in layers.values():
            rows = module.weight.reshape(module.weight.shape[0], -1)
            assert torch.all((rows == 0).sum(dim=1) == round(amount * rows.shape[1]))
    assert result.sparsity == pytest.approx(amount, abs=1e-4)
    assert result.report.layers.keys() == layers.keys()
    assert result.accuracy == result.history[-1]["accuracy"] > 0.9


def test_iterative_threshold_rounds_reapply_the_same_tau(trained, data):
    model = copy.deepcopy(trained)
    schedule = PruneSchedule(kind="iterative", steps=3, epochs_per_step=1, finetune_epochs=0)
    result = prune_with_schedule(model, MagnitudePruning(threshold=0.03), schedule, data.train, train_config=FAST)
    assert [h["target_sparsity"] for h in result.history] == [None] * 3
    assert [h["threshold"] for h in result.history] == [0.03] * 3
    assert [h["epochs"] for h in result.history] == [1, 1, 0]
    achieved = [h["achieved_sparsity"] for h in result.history]
    assert achieved[0] <= achieved[1] <= achieved[2]
    assert achieved[2] > achieved[0]  # training pushed weights under tau, the next round removed them
    for module in pruned_layers(model).values():  # no training after the last round: |w| > tau where kept
        weight = module.weight.detach()
        assert bool((weight[weight != 0].abs() > 0.03).all())
    assert result.history[0]["accuracy"] is None  # no eval_data


def test_oneshot_nm_through_the_schedule_keeps_the_pattern(trained, data):
    from torchslim.prune.unstructured import is_nm_pattern

    model = copy.deepcopy(trained)
    result = prune_with_schedule(model, NMSparsity(n=2, m=4), PruneSchedule(finetune_epochs=1), data,
                                 train_config=FAST, progress=False)
    assert set(result.report.skipped) == {"0"}  # 1*5*5 inputs: not a multiple of 4
    for name in ("2", "5", "7"):
        assert is_nm_pattern(model.get_submodule(name).weight, 2, 4)
        assert layer_sparsity(model)[name]["sparsity"] == pytest.approx(0.5)


# --- the acceptance ------------------------------------------------------------------------------------
FRESH_PROCESS = """
import sys, torch, torchslim as ts
x = torch.load(sys.argv[1], weights_only=True)
outputs = {}
for name in sys.argv[3:]:
    with torch.no_grad():
        outputs[name] = ts.load(name)(x)
torch.save(outputs, sys.argv[2])
"""


def test_acceptance_90_percent_sparse_lenet5_fine_tuned(trained, data, tmp_path):
    """90% global sparsity + fine-tuning: within 1 point of dense; .slim <= 0.2x; + 4-bit <= 0.06x; exact reload."""
    dense_accuracy = evaluate(trained, data.test)
    dense_path = ts.save(trained, tmp_path / "dense.slim")
    model = copy.deepcopy(trained)
    result = prune_with_schedule(model, MagnitudePruning(scope="global", amount=0.9), PruneSchedule(finetune_epochs=5),
                                 data, train_config=RECOMMENDED["lenet5"], eval_data=data, progress=False)
    accuracy = evaluate(model, data.test)
    assert result.accuracy == accuracy
    assert accuracy >= dense_accuracy - 0.01, (accuracy, dense_accuracy)
    assert result.sparsity == pytest.approx(0.9, abs=1e-6)
    sparse_path = ts.save(model, tmp_path / "sparse.slim")
    ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 0.2, ratio
    quantized = copy.deepcopy(model)
    quantize_(quantized, IntQuant(bits=4))
    assert evaluate(quantized, data.test) >= dense_accuracy - 0.02
    quantized_path = ts.save(quantized, tmp_path / "sparse4.slim")
    ratio4 = quantized_path.stat().st_size / dense_path.stat().st_size
    assert ratio4 <= 0.06, ratio4

    x = data.test.tensors[0][:64]
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    subprocess.run([sys.executable, str(script), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"), str(sparse_path),
                    str(quantized_path)], check=True, capture_output=True, text=True)
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(outputs[str(sparse_path)], model(x))
        assert torch.equal(outputs[str(quantized_path)], quantized(x))

"""Multi-teacher parameter fusion: hand-computed cases, convergence, properties, errors, real fine-tuned teachers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchslim as ts
from torchslim.distill.fusion import FusionResult, ParameterFusion, fuse_parameters
from torchslim.errors import ConfigError, ModelError
from torchslim.train import TrainConfig, evaluate, train


def teachers_of(*columns: list[float], key: str = "w") -> list[dict[str, torch.Tensor]]:
    """One state dict per teacher: ``columns[k]`` is teacher k's tensor."""
    return [{key: torch.tensor(values, dtype=torch.float32)} for values in columns]


def bisect(f, lo: float, hi: float) -> float:
    """A root of a continuous f with a sign change on [lo, hi] (an independent check of the iteration)."""
    assert f(lo) * f(hi) < 0
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(lo) * f(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


# --- hand-computed cases -----------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["abs", "squared"])
@pytest.mark.parametrize("alpha", [-50.0, -1.0, 0.0, 3.0])
def test_two_teachers_fuse_to_their_mean_for_any_alpha(distance, alpha):
    # From the mean both teachers are equally far, so their weights are equal and the mean is a fixed point.
    result = fuse_parameters(teachers_of([0.0, -1.0, 2.5], [1.0, 3.0, 2.5]), alpha=alpha, distance=distance)
    assert torch.allclose(result.state_dict["w"], torch.tensor([0.5, 1.0, 2.5]), atol=1e-7)
    assert result.iterations == 1 and result.residual == 0.0 and result.converged
    assert result.teacher_weights == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("distance", "expected"),
    [
        # teachers 0, 0, 3; start at the mean 1: D = 1, 1, 2 (abs) or 1, 1, 4 (squared), alpha = -1
        ("abs", 3 * math.exp(-2) / (2 * math.exp(-1) + math.exp(-2))),  # = 3 / (2e + 1)
        ("squared", 3 * math.exp(-4) / (2 * math.exp(-1) + math.exp(-4))),  # = 3 / (2e^3 + 1)
    ],
)
def test_three_teachers_first_iteration_by_hand(distance, expected):
    result = fuse_parameters(teachers_of([0.0], [0.0], [3.0]), alpha=-1.0, distance=distance, max_iter=1)
    assert result.state_dict["w"].item() == pytest.approx(expected, abs=1e-6)
    assert result.iterations == 1
    assert result.residual == pytest.approx(1 - expected, abs=1e-6)
    assert not result.converged  # one iteration was not enough for tol = 1e-6


@pytest.mark.parametrize("distance", ["abs", "squared"])
def test_three_teachers_converge_to_the_root_of_the_seed_equation(distance):
    teachers = [0.0, 0.0, 3.0]

    def dist(a, b):
        return abs(a - b) if distance == "abs" else (a - b) ** 2

    def equation(s):  # W_s - sum_k W_k exp(alpha D) / sum_k exp(alpha D), alpha = -1
        weights = [math.exp(-dist(w, s)) for w in teachers]
        return s - sum(w * e for w, e in zip(teachers, weights, strict=True)) / sum(weights)

    root = bisect(equation, 0.0, 0.5)  # the root reached from the mean (1.0); 3.0 is outside this bracket
    result = fuse_parameters(teachers_of([0.0], [0.0], [3.0]), alpha=-1.0, distance=distance, tol=1e-10)
    assert result.converged and result.residual <= 1e-10
    assert result.state_dict["w"].item() == pytest.approx(root, abs=1e-6)
    # the outlier teacher (3.0) gets the small share
    assert result.teacher_weights[2] < 0.05 < result.teacher_weights[0] == pytest.approx(result.teacher_weights[1])


def test_alpha_zero_is_exactly_the_mean():
    generator = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 5, generator=generator), "b": torch.randn(7, generator=generator)} for _ in range(4)]
    result = fuse_parameters(states, alpha=0.0)
    for key in ("a", "b"):
        mean = torch.stack([s[key].double() for s in states]).mean(0).float()
        assert torch.equal(result.state_dict[key], mean)
    assert result.iterations == 1 and result.residual == 0.0
    assert result.teacher_weights == pytest.approx([0.25] * 4)


def test_negative_alpha_pulls_toward_the_majority_and_more_strongly_as_it_grows():
    states = teachers_of([1.0], [1.0], [1.0], [5.0])  # mean 2.0, majority at 1.0
    fused = {alpha: fuse_parameters(states, alpha=alpha).state_dict["w"].item() for alpha in (0.0, -0.5, -1.0, -4.0)}
    assert fused[0.0] == pytest.approx(2.0)
    assert 2.0 > fused[-0.5] > fused[-1.0] > fused[-4.0] >= 1.0
    assert fused[-4.0] == pytest.approx(1.0, abs=1e-5)
    # alpha > 0 does the opposite: the far teacher gains weight
    assert fuse_parameters(states, alpha=0.1).state_dict["w"].item() > 2.0


def test_convergence_residual_shrinks_with_iterations_and_flags_the_cap():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=generator)
    states = [{"w": base + 0.3 * torch.randn(200, generator=generator)} for _ in range(5)]
    residuals = [fuse_parameters(states, alpha=-2.0, max_iter=k).residual for k in (1, 2, 4, 8)]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < residuals[0] / 10
    capped = fuse_parameters(states, alpha=-2.0, max_iter=2)
    assert not capped.converged and capped.iterations == 2 and capped.residual > 1e-6
    full = fuse_parameters(states, alpha=-2.0, tol=1e-9, max_iter=500)
    assert full.converged and full.residual <= 1e-9 and full.iterations < 500
    # the converged weights are a fixed point of the formula
    stack = torch.stack([s["w"].double() for s in states])
    w = full.state_dict["w"].double()
    weights = torch.softmax(-2.0 * (stack - w).abs(), dim=0)
    assert torch.allclose((weights * stack).sum(0), w, atol=1e-6)


def test_large_alpha_is_stable():
    # exp(-1e6 * D) underflows to 0 for every teacher without the per-element max subtraction
    states = teachers_of([0.0, 10.0], [0.1, 10.0], [5.0, 20.0])
    result = fuse_parameters(states, alpha=-1e6, distance="squared")
    fused = result.state_dict["w"]
    assert torch.isfinite(fused).all()
    assert result.converged


# --- properties --------------------------------------------------------------------------------------
finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    columns=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=5),
    alpha=st.floats(-20, 0),
    distance=st.sampled_from(["abs", "squared"]),
)
def test_fused_weights_stay_between_the_teachers_and_ignore_their_order(columns, alpha, distance):
    states = teachers_of(*columns)
    result = fuse_parameters(states, alpha=alpha, distance=distance, max_iter=20)
    stack = torch.stack([s["w"] for s in states])
    fused = result.state_dict["w"]
    slack = 1e-5 * (1 + stack.abs().max())
    assert (fused >= stack.min(0).values - slack).all() and (fused <= stack.max(0).values + slack).all()
    reversed_result = fuse_parameters(states[::-1], alpha=alpha, distance=distance, max_iter=20)
    assert torch.allclose(reversed_result.state_dict["w"], fused, atol=float(slack))
    assert sum(result.teacher_weights) == pytest.approx(1.0)


def test_identical_teachers_give_the_same_weights():
    model = nn.Linear(4, 3)
    result = fuse_parameters([model, copy.deepcopy(model), copy.deepcopy(model)], alpha=-5.0)
    for key, value in model.state_dict().items():
        assert torch.equal(result.state_dict[key], value)


def test_dtype_device_and_keys_follow_the_first_teacher_and_filter_fn_copies():
    states = [{"h": torch.tensor([1.0, 2.0], dtype=torch.float16), "b": torch.tensor([0.0])},
              {"h": torch.tensor([3.0, 4.0], dtype=torch.float16), "b": torch.tensor([2.0])}]
    result = fuse_parameters(states, alpha=0.0, filter_fn=lambda name: name != "b")
    assert list(result.state_dict) == ["h", "b"]
    assert result.state_dict["h"].dtype == torch.float16
    assert result.state_dict["h"].tolist() == [2.0, 3.0]
    assert result.state_dict["b"].tolist() == [0.0]  # copied from teacher 0, not averaged
    assert not result.tensors["b"].fused and result.tensors["h"].fused


def test_batchnorm_counters_take_the_largest_and_running_stats_are_fused():
    nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    for steps, net in zip((2, 5), nets, strict=True):
        net.train()
        for _ in range(steps):
            net(torch.randn(8, 3))
    result = fuse_parameters(nets, alpha=0.0)
    assert result.state_dict["1.num_batches_tracked"].item() == 5
    mean = (nets[0][1].running_mean.double() + nets[1][1].running_mean.double()) / 2
    assert torch.allclose(result.state_dict["1.running_mean"], mean.float())
    merged = copy.deepcopy(nets[0])
    merged.load_state_dict(result.state_dict)  # strict: same keys, shapes and dtypes


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": float("nan")}, "ParameterFusion.alpha = nan is invalid: expected a number"),
        ({"alpha": float("inf")}, "ParameterFusion.alpha = inf"),
        ({"distance": "l3"}, "ParameterFusion.distance = 'l3' is invalid: expected one of 'abs', 'squared'"),
        ({"tol": 0.0}, "ParameterFusion.tol = 0.0 is invalid: expected a number > 0"),
        ({"max_iter": 0}, "ParameterFusion.max_iter = 0 is invalid: expected an integer >= 1"),
    ],
)
def test_bad_settings_name_the_field_value_and_range(kwargs, message):
    with pytest.raises(ConfigError) as info:
        fuse_parameters(teachers_of([0.0], [1.0]), **kwargs)
    assert message in str(info.value)


def test_one_teacher_is_refused():
    with pytest.raises(ConfigError, match="teachers has 1 entry: expected at least 2"):
        fuse_parameters(teachers_of([0.0]))
    with pytest.raises(ConfigError, match="expected a list of two or more"):
        fuse_parameters(nn.Linear(2, 2))


def test_different_shapes_or_keys_name_the_tensor():
    with pytest.raises(ModelError, match=r"tensor 'weight' has shape \(3, 5\) in teacher 1 but \(3, 4\) in teacher 0"):
        fuse_parameters([nn.Linear(4, 3), nn.Linear(5, 3)])
    with pytest.raises(ModelError, match="teacher 1 does not have teacher 0's tensors.*missing 'bias'"):
        fuse_parameters([nn.Linear(4, 3), nn.Linear(4, 3, bias=False)])


def test_differing_integer_tensors_are_refused():
    states = [{"codes": torch.tensor([1, 2], dtype=torch.uint8)}, {"codes": torch.tensor([1, 3], dtype=torch.uint8)}]
    with pytest.raises(ModelError, match="tensor 'codes' .* differs between teacher 0 and teacher 1"):
        fuse_parameters(states)


def test_quantized_and_masked_models_are_refused():
    quantized = ts.create_model("student_mlp", image_size=4, hidden=8)
    ts.quantize_(quantized, ts.IntQuant(bits=4))
    with pytest.raises(ModelError, match="teacher 0: module '1' .*quantized/packed layer: fusion works on float"):
        fuse_parameters([quantized, copy.deepcopy(quantized)])
    masked = ts.create_model("student_mlp", image_size=4, hidden=8)
    ts.prune_(masked, ts.MagnitudePruning(amount=0.5))
    with pytest.raises(ModelError, match="pruning mask attached: call torchslim.finalize_"):
        fuse_parameters([masked, masked])
    with pytest.raises(ModelError, match="pruning mask beside it"):
        fuse_parameters([masked.state_dict(), masked.state_dict()])


# --- real teachers -----------------------------------------------------------------------------------
def test_fused_fine_tuned_lenets_score_within_the_teachers_range(trained_lenet5, digits):
    teachers = []
    for seed in (1, 2, 3):
        model = copy.deepcopy(trained_lenet5)
        train(model, digits.train, TrainConfig(epochs=1, lr=1e-3, seed=seed, augment_shift=2), progress=False)
        teachers.append(model)
    accuracies = [evaluate(model, digits.test) for model in teachers]
    result = fuse_parameters(teachers, alpha=-1.0)
    assert isinstance(result, FusionResult) and result.converged
    fused = copy.deepcopy(trained_lenet5)
    fused.load_state_dict(result.state_dict)
    assert evaluate(fused, digits.test) >= min(accuracies)
    assert ts.fuse_parameters is fuse_parameters and ts.ParameterFusion is ParameterFusion

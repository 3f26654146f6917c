"""The seed's pruning rule, scopes, N:M, masks during fine-tuning and sparse files."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, DataError
from torchslim.prune import MagnitudePruning, NMSparsity, finalize_, layer_sparsity, prune_
from torchslim.prune.unstructured import is_nm_pattern, keep_fraction_mask, nm_mask


def lenet5(seed=0):
    torch.manual_seed(seed)
    model = ts.create_model("lenet5")
    with torch.no_grad():  # spread the weights so a tau of 0.05 cuts a real fraction of them
        for p in model.parameters():
            p.mul_(8)
    return model


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_global_threshold_mask_is_exactly_abs_w_greater_than_tau():
    model = lenet5()
    before = weights(model)
    report = prune_(model, MagnitudePruning(scope="global", threshold=0.05))
    for name, w in before.items():
        module = model.get_submodule(name)
        assert torch.equal(module.weight_mask.bool(), w.abs() > 0.05), name
    assert report.threshold == 0.05
    expected = sum(int((w.abs() <= 0.05).sum()) for w in before.values()) / sum(w.numel() for w in before.values())
    assert report.sparsity == pytest.approx(expected)
    assert 0.05 < report.sparsity < 0.95


def test_neuron_scope_judges_each_neuron_on_its_own_weights():
    model = lenet5()
    before = weights(model)
    prune_(model, MagnitudePruning(scope="neuron", threshold=0.05))
    for name, w in before.items():
        assert torch.equal(model.get_submodule(name).weight_mask.bool(), w.abs() > 0.05)
    model = lenet5()
    prune_(model, MagnitudePruning(scope="neuron", std_multiplier=0.5))
    for name, w in before.items():
        rows = w.reshape(w.shape[0], -1)
        tau = 0.5 * rows.std(dim=1, unbiased=False, keepdim=True)
        expected = (rows.abs() > tau).reshape(w.shape)
        assert torch.equal(model.get_submodule(name).weight_mask.bool(), expected)
    model = lenet5()
    prune_(model, MagnitudePruning(scope="neuron", amount=0.75))
    for name in before:
        mask = model.get_submodule(name).weight_mask.reshape(before[name].shape[0], -1)
        per_row = (mask == 0).sum(dim=1)
        assert torch.all(per_row == round(0.75 * mask.shape[1])), name


def test_global_amount_prunes_exactly_that_fraction_and_layer_amount_each_layer():
    model = lenet5()
    report = prune_(model, MagnitudePruning(scope="global", amount=0.9))
    total = sum(r["numel"] for r in report.layers.values())
    assert sum(r["zeros"] for r in report.layers.values()) == round(0.9 * total)
    sparsities = [r["sparsity"] for r in report.layers.values()]
    assert max(sparsities) - min(sparsities) > 0.05  # global: layers differ
    model = lenet5()
    report = prune_(model, MagnitudePruning(scope="layer", amount=0.5))
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in report.layers.values())


def test_masks_keep_pruned_weights_at_zero_during_training_and_finalize_writes_true_zeros(tmp_path):
    model = lenet5()
    prune_(model, MagnitudePruning(scope="global", amount=0.8))
    masks = {n: model.get_submodule(n).weight_mask.clone() for n in weights(model)}
    data = ts.load_data("digits")
    ts.train(model, data.train, ts.TrainConfig(epochs=1, lr=1e-3), progress=False)
    for name, mask in masks.items():
        assert bool((model.get_submodule(name).weight[mask == 0] == 0).all())
    with pytest.raises(ValueError):  # a mask beside a full weight is never saved
        ts.save(model, tmp_path / "masked.slim")
    assert finalize_(model) == 4
    assert finalize_(model) == 0
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert not hasattr(model.get_submodule(name), "weight_mask")
        assert torch.equal(w == 0, mask == 0)
        assert not bool(torch.signbit(w[w == 0]).any())  # +0.0, so the file stores them sparse
    dense_path, sparse_path = tmp_path / "dense.slim", tmp_path / "sparse.slim"
    ts.save(lenet5(), dense_path)
    ts.save(model, sparse_path)
    assert os.path.getsize(sparse_path) < 0.3 * os.path.getsize(dense_path)
    assert layer_sparsity(ts.load(sparse_path))["5"]["sparsity"] > 0.5


def test_repeated_pruning_only_removes_more():
    model = lenet5()
    prune_(model, MagnitudePruning(scope="global", amount=0.5))
    first = {n: model.get_submodule(n).weight_mask.clone() for n in weights(model)}
    report = prune_(model, MagnitudePruning(scope="global", amount=0.8))
    for name, mask in first.items():
        assert bool((model.get_submodule(name).weight_mask <= mask).all())
    assert report.sparsity >= 0.8 - 1e-6


def test_taylor_criterion_uses_gradients_and_needs_data():
    model = lenet5()
    data = ts.load_data("digits")
    report = prune_(model, MagnitudePruning(scope="global", amount=0.5, criterion="taylor"), data=data)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    magnitude = lenet5()
    prune_(magnitude, MagnitudePruning(scope="global", amount=0.5))
    assert not torch.equal(model.get_submodule("5").weight_mask, magnitude.get_submodule("5").weight_mask)
    with pytest.raises(DataError, match="criterion 'taylor' needs data"):
        prune_(lenet5(), MagnitudePruning(amount=0.5, criterion="taylor"))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_verified_and_skips_layers_that_do_not_fit(n, m):
    model = lenet5()
    report = prune_(model, NMSparsity(n=n, m=m))
    finalize_(model)
    for name in report.layers:
        assert is_nm_pattern(model.get_submodule(name).weight, n, m), name
        assert report.layers[name]["sparsity"] == pytest.approx(1 - n / m)
    assert "0" in report.skipped and "not a multiple of m" in report.skipped["0"]  # conv1 fan-in 25
    assert report.details["pattern"] == f"{n}:{m}"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), rows=st.integers(1, 5), groups=st.integers(1, 6), n=st.integers(1, 3))
def test_nm_mask_keeps_the_n_largest_of_each_group(seed, rows, groups, n):
    m = 4
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m)
    grouped_scores, grouped_keep = scores.reshape(rows, groups, m), keep.reshape(rows, groups, m)
    assert torch.all(grouped_keep.sum(-1) == n)
    kept_min = torch.where(grouped_keep, grouped_scores, torch.inf).amin(-1)
    dropped_max = torch.where(grouped_keep, -torch.inf, grouped_scores).amax(-1)
    assert torch.all(kept_min >= dropped_max)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), size=st.integers(1, 200), amount=st.floats(0, 0.99))
def test_keep_fraction_removes_exactly_the_lowest(seed, size, amount):
    scores = torch.rand(size, generator=torch.Generator().manual_seed(seed))
    keep = keep_fraction_mask(scores, amount)
    assert int((~keep).sum()) == round(amount * size)
    if (~keep).any() and keep.any():
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": -0.1}, "MagnitudePruning.threshold = -0.1"),
        ({"amount": 1.0}, "MagnitudePruning.amount = 1.0 is invalid: expected a number in [0.0, 1.0)"),
        ({"threshold": 0.1, "amount": 0.5}, "exactly one of threshold, amount, std_multiplier"),
        ({}, "exactly one of threshold, amount, std_multiplier"),
        ({"scope": "row", "amount": 0.5}, "MagnitudePruning.scope = 'row'"),
        ({"std_multiplier": 1.0}, "None unless scope='neuron'"),
        ({"criterion": "l0", "amount": 0.5}, "MagnitudePruning.criterion = 'l0'"),
    ],
)
def test_config_errors_name_field_and_range(kwargs, message):
    with pytest.raises(ConfigError) as info:
        MagnitudePruning(**kwargs)
    assert message in str(info.value)


def test_nm_config_errors_and_untouched_model_on_error():
    with pytest.raises(ConfigError, match=r"NMSparsity.n = 4 is invalid: expected an integer in \[1, 3\]"):
        NMSparsity(n=4, m=4)
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ConfigError, match="no layer has an input dimension divisible by 4"):
        prune_(model, NMSparsity())
    assert not hasattr(model[0], "weight_mask")


def test_quantized_layers_are_reported_not_pruned():
    from torchslim.quantize import IntQuant, quantize_

    model = lenet5()
    quantize_(model, IntQuant(bits=8), filter_fn=lambda m, name: name == "0")
    report = prune_(model, MagnitudePruning(amount=0.5))
    assert "prune before quantizing" in report.skipped["0"]
    assert sorted(report.layers) == ["2", "5", "7"]

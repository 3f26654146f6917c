"""The seed's example on a trained lenet5 (tau = 0.05, globally and per neuron) and the threshold sweep."""

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune import MagnitudePruning, finalize_, prune_
from torchslim.prune.sweep import ThresholdRow, plot_threshold_sweep, sweep_thresholds
from torchslim.train import evaluate

PNG = b"\x89PNG\r\n\x1a\n"
TAUS = [0.01, 0.02, 0.05, 0.1]


@pytest.fixture(scope="module")
def data(digits):
    return digits


@pytest.fixture(scope="module")
def trained(trained_lenet5):
    return trained_lenet5


@pytest.fixture(scope="module")
def rows(trained, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    result = sweep_thresholds(trained, data, TAUS, plot_path=folder / "tau.png", size_plot_path=folder / "size.png")
    after = trained.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # unchanged
    return result, folder


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_seed_example_global_tau_005_mask_is_abs_w_greater_than_tau(trained, data):
    model = copy.deepcopy(trained)
    before = weights(model)
    report = prune_(model, MagnitudePruning(scope="global", threshold=0.05))
    assert report.threshold == 0.05 and set(report.layers) == set(before) == {"0", "2", "5", "7"}
    for name, w in before.items():
        assert torch.equal(model.get_submodule(name).weight_mask.bool(), w.abs() > 0.05), name
    zeros = sum(int((w.abs() <= 0.05).sum()) for w in before.values())
    assert report.sparsity == zeros / sum(w.numel() for w in before.values())
    assert 0.5 < report.sparsity < 0.999  # a trained lenet5's weights are small: tau = 0.05 cuts most of them
    pruned_accuracy = evaluate(model, data.test)
    assert finalize_(model) == 4
    for name, w in before.items():  # finalized: the kept weights untouched, the others +0.0
        final = model.get_submodule(name).weight.detach()
        assert torch.equal(final, torch.where(w.abs() > 0.05, w, torch.zeros_like(w))), name
        assert not bool(torch.signbit(final[final == 0]).any())
    assert evaluate(model, data.test) == pruned_accuracy


def test_seed_example_neuron_scope_judges_each_neuron(trained):
    before = weights(trained)
    model = copy.deepcopy(trained)
    prune_(model, MagnitudePruning(scope="neuron", std_multiplier=1.0))
    for name, w in before.items():
        mask = model.get_submodule(name).weight_mask.reshape(w.shape[0], -1)
        for row, (weights_row, mask_row) in enumerate(zip(w.reshape(w.shape[0], -1), mask, strict=True)):
            tau = 1.0 * weights_row.std(unbiased=False)
            assert torch.equal(mask_row.bool(), weights_row.abs() > tau), (name, row)
    model = copy.deepcopy(trained)
    prune_(model, MagnitudePruning(scope="neuron", threshold=0.05))
    for name, w in before.items():
        assert torch.equal(model.get_submodule(name).weight_mask.bool(), w.abs() > 0.05), name
    model = copy.deepcopy(trained)
    prune_(model, MagnitudePruning(scope="neuron", amount=0.8))
    for name, w in before.items():
        rows = w.reshape(w.shape[0], -1)
        mask = model.get_submodule(name).weight_mask.reshape(rows.shape).bool()
        assert torch.all((~mask).sum(dim=1) == round(0.8 * rows.shape[1])), name
        # the weights kept in a neuron are its largest: every kept |w| >= every pruned |w| of that neuron
        kept_min = torch.where(mask, rows.abs(), torch.inf).min(dim=1).values
        pruned_max = torch.where(~mask, rows.abs(), -torch.inf).max(dim=1).values
        assert bool((kept_min >= pruned_max).all()), name


def test_sweep_rows_fp32_first_then_each_tau_measured(rows, trained, data, tmp_path):
    result, _ = rows
    assert [r.label for r in result] == ["fp32", "tau=0.01", "tau=0.02", "tau=0.05", "tau=0.1"]
    assert [r.threshold for r in result] == [None, *TAUS]
    fp32 = result[0]
    assert fp32.sparsity == 0.0 and fp32.accuracy == evaluate(trained, data.test)
    assert fp32.file_bytes == ts.save(trained, tmp_path / "dense.slim").stat().st_size
    before = weights(trained)
    total = sum(w.numel() for w in before.values())
    for row in result[1:]:
        expected = sum(int((w.abs() <= row.threshold).sum()) for w in before.values()) / total
        assert row.sparsity == pytest.approx(expected, abs=1e-12)
        for name, w in before.items():
            assert row.layers[name] == pytest.approx(float((w.abs() <= row.threshold).float().mean()))
    # the sweep's tau=0.05 row is the seed's example
    model = copy.deepcopy(trained)
    prune_(model, MagnitudePruning(scope="global", threshold=0.05))
    assert result[3].accuracy == evaluate(model, data.test)


def test_sweep_is_monotone_in_tau(rows):
    result, _ = rows
    sparsity = [r.sparsity for r in result]
    sizes = [r.file_bytes for r in result]
    assert all(a < b for a, b in zip(sparsity, sparsity[1:], strict=False))
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    assert result[1].accuracy >= result[0].accuracy - 0.01  # tau = 0.01 costs (almost) nothing
    assert result[-1].accuracy < 0.5  # tau = 0.1 removes nearly everything


def test_sweep_plots_are_pngs(rows, tmp_path):
    result, folder = rows
    assert (folder / "tau.png").read_bytes()[:8] == PNG
    assert (folder / "size.png").read_bytes()[:8] == PNG
    assert plot_threshold_sweep(result, tmp_path / "again.png").read_bytes()[:8] == PNG
    assert isinstance(result[0], ThresholdRow) and set(result[0].to_dict()) >= {"threshold", "sparsity", "layers"}


@pytest.mark.parametrize(
    ("thresholds", "kwargs", "message"),
    [
        ([], {}, "thresholds = [] is invalid"),
        ([0.01, -0.5], {}, "MagnitudePruning.threshold = -0.5"),
        ([0.01], {"scope": "row"}, "MagnitudePruning.scope = 'row'"),
    ],
)
def test_sweep_validates_before_any_work(trained, data, tmp_path, thresholds, kwargs, message):
    plot = tmp_path / "p.png"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sweep_thresholds(trained, data, thresholds, plot_path=plot, **kwargs)
    assert not plot.exists()

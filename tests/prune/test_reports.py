"""Every pruning handler returns one report type: ``prune_`` gives a ``PruneReport`` whatever the config."""

import json

import pytest
import torch

import torchslim as ts
from torchslim.prune import ChannelPruning, MagnitudePruning, NMSparsity, PruneReport, prune_


@pytest.mark.parametrize("config", [MagnitudePruning(scope="layer", amount=0.5), NMSparsity(),
                                    ChannelPruning(amount=0.5)], ids=lambda c: c.config_name)
def test_prune_returns_a_prune_report_for_every_method(config):
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    report = prune_(model, config, example_inputs=torch.rand(2, 1, 28, 28))
    assert isinstance(report, PruneReport)
    # what a caller of the PruneReport API reads works on each: the overall sparsity, skipped layers, text, JSON
    assert 0.3 < report.sparsity < 0.8
    assert isinstance(report.skipped, dict) and str(report)
    assert json.loads(json.dumps(report.to_dict()))["sparsity"] == pytest.approx(report.sparsity)


def test_channel_pruning_sparsity_is_the_fraction_of_parameters_removed():
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    before = sum(p.numel() for p in model.parameters())
    report = prune_(model, ChannelPruning(amount=0.5), example_inputs=torch.rand(2, 1, 28, 28))
    after = sum(p.numel() for p in model.parameters())
    assert report.sparsity == pytest.approx(1 - after / before)

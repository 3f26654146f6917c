from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.errors import DataError
from torchslim.measure import accuracy, fidelity


def argmax_data(n: int = 40, features: int = 4) -> TensorDataset:
    """Labels are the arg-max feature except for the last quarter, which is labelled wrong."""
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(0))
    y = x.argmax(dim=1)
    y[3 * n // 4 :] = (y[3 * n // 4 :] + 1) % features
    return TensorDataset(x, y)


def argmax_model() -> nn.Module:
    # predicts the arg-max feature in eval mode; in train mode dropout would scramble it
    return nn.Sequential(nn.Dropout(p=0.9), nn.Identity())


@pytest.mark.parametrize("wrap", ["dataset", "loader", "splits"])
def test_accuracy_known_answer(wrap):
    data = argmax_data()
    source = {
        "dataset": data,
        "loader": DataLoader(data, batch_size=7),
        "splits": types.SimpleNamespace(train=None, test=data),
    }[wrap]
    model = argmax_model().train()
    assert accuracy(model, source, batch_size=9) == pytest.approx(0.75, abs=1e-12)
    assert model.training and model[0].training


def test_accuracy_empty_data_raises():
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no samples"):
        accuracy(argmax_model(), empty)


def test_accuracy_needs_labels():
    with pytest.raises(DataError, match="labelled"):
        accuracy(argmax_model(), torch.randn(5, 4))


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def test_fidelity_against_itself_is_perfect():
    model = linear_model()
    scores = fidelity(model, model, torch.randn(50, 6))
    assert scores["agreement"] == 1.0
    assert scores["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_fidelity_against_negated_model():
    model = linear_model()
    negated = copy.deepcopy(model)
    with torch.no_grad():
        negated[2].weight.neg_()
        negated[2].bias.neg_()
    scores = fidelity(model, negated, torch.randn(50, 6))
    # logits are exact negatives: top-1 is the other model's bottom-1, cosine is -1
    assert scores["agreement"] == 0.0
    assert scores["cosine"] == pytest.approx(-1.0, abs=1e-9)


def test_fidelity_perturbed_model_in_between_and_same_for_all_inputs():
    model = linear_model()
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    from_tensor = fidelity(noisy, model, x, batch_size=10)
    assert 0.0 < from_tensor["cosine"] < 0.9999
    assert 0.0 <= from_tensor["agreement"] < 1.0
    from_dataset = fidelity(noisy, model, TensorDataset(x, torch.zeros(64, dtype=torch.long)))
    from_loader = fidelity(noisy, model, DataLoader(TensorDataset(x), batch_size=64))
    for other in (from_dataset, from_loader):
        assert other["agreement"] == from_tensor["agreement"]
        assert other["cosine"] == pytest.approx(from_tensor["cosine"], abs=1e-6)  # float32 batching


def test_fidelity_empty_inputs_raise():
    model = linear_model()
    with pytest.raises(DataError, match="no samples"):
        fidelity(model, model, torch.zeros(0, 6))

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.quantize import IntQuant
from torchslim.quantize.sensitivity import sensitivity


def make_problem():
    """A 2-layer MLP where the first layer carries large weights and the head is nearly an identity."""
    torch.manual_seed(0)
    model = create_model("student_mlp", num_classes=4, in_channels=8, image_size=1, hidden=16)
    x = torch.randn(200, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # labels = the float model's own predictions: baseline accuracy is 1.0
    return model, TensorDataset(x, y)


def test_every_layer_is_measured_and_the_model_is_untouched():
    model, data = make_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = sensitivity(model, data, IntQuant(bits=2))
    assert sorted(r.layer for r in results) == ["1", "3"]
    for r in results:
        assert 0.0 <= r.accuracy <= 1.0
        assert r.accuracy_drop == pytest.approx(1.0 - r.accuracy)
        assert r.agreement == pytest.approx(r.accuracy)  # labels are the model's own predictions
        assert r.cosine <= 1.0 + 1e-9
    drops = [r.accuracy_drop for r in results]
    assert drops == sorted(drops, reverse=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Linear) for m in (model[1], model[3]))


def test_more_bits_are_less_damaging():
    model, data = make_problem()
    two = {r.layer: r.cosine for r in sensitivity(model, data, IntQuant(bits=2))}
    eight = {r.layer: r.cosine for r in sensitivity(model, data, IntQuant(bits=8))}
    assert all(eight[name] > two[name] for name in two)
    assert all(r.accuracy_drop <= 0.02 for r in sensitivity(model, data, IntQuant(bits=8)))


def test_unknown_layer_is_refused():
    model, data = make_problem()
    with pytest.raises(ConfigError, match="layers names 'fc'"):
        sensitivity(model, data, IntQuant(), layers=["fc"])

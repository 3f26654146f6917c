"""A quickly trained lenet300 on digits, shared by the pipeline tests (copy before changing it)."""

import pytest
import torch

import torchslim as ts


@pytest.fixture(scope="session")
def small_model(digits):
    """lenet300 trained for 3 epochs (about 97% on digits): small enough for fast recipe and planner runs."""
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    ts.train(model, digits.train, ts.TrainConfig(epochs=3, augment_shift=0), progress=False)
    return model.eval()

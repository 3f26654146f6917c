"""Models with NaN/Inf weights are refused before any work: quantize_, QAT, prune_ and save."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as ts
from torchslim.errors import DataError, ModelError
from torchslim.testing import tiny_mlp


def _broken(value: float, where: str = "3.weight") -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_mlp()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[5] = value
    return model


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(before: dict, model: torch.nn.Module) -> bool:
    after = model.state_dict()
    if list(before) != list(after):
        return False
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    return True


STAGES = {
    "quantize_ int4": lambda m: ts.quantize_(m, ts.IntQuant(bits=4)),
    "quantize_ fp16": lambda m: ts.quantize_(m, ts.HalfPrecision()),
    "quantize_ codebook": lambda m: ts.quantize_(m, ts.CodebookQuant(bits=2)),
    "prepare_qat_": lambda m: ts.prepare_qat_(m, ts.IntQuant(bits=4)),
    "prune_ magnitude": lambda m: ts.prune_(m, ts.MagnitudePruning(amount=0.5)),
    "prune_ n:m": lambda m: ts.prune_(m, ts.NMSparsity(n=2, m=4)),
    "prune_ channels": lambda m: ts.prune_(m, ts.ChannelPruning(amount=0.5), example_inputs=torch.randn(2, 16)),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("stage", list(STAGES))
def test_non_finite_weights_are_refused_before_the_model_changes(stage, value):
    model = _broken(value)
    before, modules = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(ModelError, match=r"parameter '3\.weight' holds 1 NaN/Inf value\(s\) out of 128"):
        STAGES[stage](model)
    assert [type(m) for m in model.modules()] == modules
    assert _same(before, model)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_a_layer_skipped_by_overrides_may_hold_non_finite_weights():
    model = _broken(float("nan"))
    report = ts.quantize_(model, ts.IntQuant(bits=4), overrides={"3": None})
    assert list(report.quantized) == ["1"] and report.skipped["3"] == "override is None"


def test_save_refuses_non_finite_parameters_and_writes_nothing(tmp_path):
    path = tmp_path / "m.slim"
    good = tiny_mlp()
    ts.save(good, path)
    old = path.read_bytes()
    broken = _broken(float("nan"), where="1.bias")
    with pytest.raises(ModelError, match=r"save\(.*m\.slim'\): parameter '1\.bias' holds 1 NaN/Inf.*allow_nonfinite"):
        ts.save(broken, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slim"]
    # the escape hatch keeps a diverged model bit for bit
    ts.save(broken, path, allow_nonfinite=True)
    assert ts.load(path).get_parameter("1.bias").isnan().sum() == 1


def test_non_finite_buffers_are_allowed():
    model = copy.deepcopy(tiny_mlp())
    model.register_buffer("causal_mask", torch.full((2, 2), float("-inf")))
    ts.prune_(model, ts.MagnitudePruning(amount=0.5))  # buffers may hold -inf masks on purpose


def test_example_inputs_that_do_not_fit_are_a_data_error_before_pruning():
    model = tiny_mlp()
    model.train()
    before = _state(model)
    with pytest.raises(DataError, match=r"prune_: example_inputs of shape \(2, 10\) do not fit the model \(mat1"):
        ts.prune_(model, ts.ChannelPruning(amount=0.5), example_inputs=torch.zeros(2, 10))
    assert _same(before, model) and model.training and all(m.training for m in model.modules())

"""ONNX export: the graph computes what the PyTorch model computes, at any batch size, written atomically."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import torchslim as ts
from torchslim.errors import DataError, MissingDependencyError, ModelError, TorchSlimError
from torchslim.export import check_parity, export_onnx, optimized_op_types, ort_session, run_onnx


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so folding them into the convs is really tested."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.2)
    return model.eval()


MODELS = [
    ("lenet300", {}),
    ("lenet5", {}),
    ("resnet", {"widths": (8, 16), "blocks": (1, 1)}),
]


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def exported(request):
    name, kwargs = request.param
    torch.manual_seed(0)
    model = _randomize_batchnorm(ts.create_model(name, **kwargs))
    return model, export_onnx(model, torch.randn(2, 1, 28, 28))


def test_exported_graph_matches_the_model(exported):
    model, data = exported
    inputs = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    result = check_parity(model, data, inputs, atol=1e-4, min_agreement=1.0)
    assert result["samples"] == 16
    assert result["max_abs_error"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    graph = onnx.load_from_string(data)
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["output"]


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_runs_any_batch_size(exported, batch):
    model, data = exported
    inputs = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    (got,) = run_onnx(ort_session(data, 1), inputs)
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_static_batch_when_asked():
    model = ts.create_model("lenet300").eval()
    data = export_onnx(model, torch.randn(2, 1, 28, 28), dynamic_batch=False)
    session = ort_session(data, 1)
    assert session.get_inputs()[0].shape == [2, 1, 28, 28]
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        session.run(None, {"input": np.zeros((7, 1, 28, 28), np.float32)})


def test_export_restores_training_mode_and_batchnorm_is_folded():
    model = _randomize_batchnorm(ts.create_model("resnet", widths=(8,), blocks=(1,))).train()
    data = export_onnx(model, torch.randn(2, 1, 28, 28))
    assert model.training and all(m.training for m in model.modules())
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_tampered_graph_fails_parity_with_the_numbers():
    torch.manual_seed(0)
    model = ts.create_model("lenet300").eval()
    data = export_onnx(model, torch.randn(1, 1, 28, 28))
    graph = onnx.load_from_string(data)
    last_bias = [init for init in graph.graph.initializer if init.name.endswith("bias")][-1]
    bias = numpy_helper.to_array(last_bias).copy()
    bias[3] += 100.0  # every sample now predicts class 3
    last_bias.CopyFrom(numpy_helper.from_array(bias, last_bias.name))
    inputs = torch.randn(32, 1, 28, 28)
    with pytest.raises(TorchSlimError, match=r"max_abs_error = 100(\.\d+)? \(allowed <= 0\.001\).*top1_agreement"):
        check_parity(model, graph.SerializeToString(), inputs, atol=1e-3)
    # agreement alone is checked too: atol=None still fails on the changed predictions
    with pytest.raises(TorchSlimError, match=r"top1_agreement = 0\.\d+ \(allowed >= 0\.9900\)"):
        check_parity(model, graph.SerializeToString(), inputs, atol=None)
    assert check_parity(model, data, inputs, atol=1e-3)["top1_agreement"] == 1.0


def test_parity_needs_samples():
    model = ts.create_model("lenet300").eval()
    data = export_onnx(model, torch.randn(1, 1, 28, 28))
    with pytest.raises(DataError, match="no samples"):
        check_parity(model, data, torch.empty(0, 1, 28, 28), atol=1e-3)


def test_export_writes_atomically(tmp_path):
    model = ts.create_model("lenet5").eval()
    path = tmp_path / "model.onnx"
    data = export_onnx(model, torch.randn(1, 1, 28, 28), path)
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary file left behind

    class Broken(nn.Module):
        def forward(self, x):
            return {"logits": x}

    path.write_bytes(b"old")
    with pytest.raises(ModelError, match="Broken returns a dict"):
        export_onnx(Broken(), torch.randn(1, 3), path)
    assert path.read_bytes() == b"old"  # a failed export leaves the old file untouched
    with pytest.raises(TorchSlimError, match="does not exist"):
        export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "missing" / "model.onnx")


def test_several_inputs_and_outputs_are_named_in_order():
    class TwoInTwoOut(nn.Module):
        def forward(self, a, b):
            return a + b, a * b

    data = export_onnx(TwoInTwoOut(), (torch.randn(1, 3), torch.randn(1, 3)))
    graph = onnx.load_from_string(data).graph
    assert [i.name for i in graph.input] == ["input_0", "input_1"]
    assert [o.name for o in graph.output] == ["output_0", "output_1"]
    a, b = torch.ones(4, 3), torch.full((4, 3), 2.0)
    added, multiplied = run_onnx(ort_session(data), (a, b))
    assert np.array_equal(added, np.full((4, 3), 3.0)) and np.array_equal(multiplied, np.full((4, 3), 2.0))


def test_bad_arguments_name_the_value():
    model = ts.create_model("lenet300")
    with pytest.raises(TorchSlimError, match=r"opset = 9 is invalid: expected an integer in \[13, 21\]"):
        export_onnx(model, torch.randn(1, 1, 28, 28), opset=9)
    with pytest.raises(DataError, match="example_inputs is a list"):
        export_onnx(model, [])
    with pytest.raises(ModelError, match=r"cannot run Sequential on example inputs of shape \(1, 5\)"):
        export_onnx(model, torch.randn(1, 5))
    data = export_onnx(model, torch.randn(1, 1, 28, 28))
    with pytest.raises(TorchSlimError, match="num_threads = 0 is invalid"):
        ort_session(data, 0)
    with pytest.raises(TorchSlimError, match="onnxruntime cannot load the ONNX graph"):
        ort_session(b"not an onnx graph")


def test_optimized_op_types_reports_what_ort_runs():
    data = export_onnx(ts.create_model("lenet5").eval(), torch.randn(1, 1, 28, 28))
    ops = optimized_op_types(data)
    assert ops["Conv"] == 2 and "QLinearConv" not in ops


def test_missing_onnxruntime_says_what_to_install(monkeypatch):
    data = export_onnx(ts.create_model("lenet300"), torch.randn(1, 1, 28, 28))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        ort_session(data)


def test_import_torchslim_does_not_import_onnxruntime():
    code = (
        "import sys, torchslim, torchslim.models, torchslim.artifact, torchslim.export, torchslim.quantize.int8\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""export(): every mode runs in ONNX Runtime with the quantized operators it promises, within parity bounds."""

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, DataError, TorchSlimError
from torchslim.export import ExportConfig, choose_opset, export, optimized_op_types, ort_session, run_onnx

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits",
                 "QAttention", "ConvInteger"}  # fmt: skip


class Attention(nn.Module):
    """Self-attention with separate q/k/v/o projections (prunable heads)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    """One post-norm transformer encoder block (BERT layout), hidden 64, 4 heads, FFN 128."""

    def __init__(self, dim: int = 64, heads: int = 4, ffn: int = 128) -> None:
        super().__init__()
        self.attn, self.ln1 = Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2, self.ln2 = nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim), nn.LayerNorm(dim)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randn(32, 16, 64, generator=torch.Generator().manual_seed(1))


def _initializer_types(data: bytes) -> set[int]:
    return {init.data_type for init in onnx.load_from_string(data).graph.initializer}


# --- lenet5 (trained), every mode --------------------------------------------------------------------------------
EXPECTED_OPS = {
    "none": (set(), {"Conv", "Gemm"}),
    "int8-static": ({"QuantizeLinear", "DequantizeLinear"}, {"QLinearConv", "QGemm"}),
    "int8-dynamic": ({"DynamicQuantizeLinear", "MatMulInteger"}, {"DynamicQuantizeMatMul"}),
    "int4-weight": ({"MatMulNBits"}, {"MatMulNBits"}),
}


@pytest.mark.parametrize("quant", list(EXPECTED_OPS))
def test_lenet5_every_mode_runs_quantized_kernels_within_parity(quant, trained_lenet5, digits, tmp_path):
    path = tmp_path / f"{quant}.onnx"
    report = export(trained_lenet5, path, ExportConfig(quant=quant), calib_data=digits)
    data = path.read_bytes()
    assert report.bytes == len(data) == len(report.graph)
    stored, executed = EXPECTED_OPS[quant]
    assert stored <= set(report.op_types)
    assert executed <= set(optimized_op_types(data))
    if quant == "none":
        assert not QUANTIZED_OPS & set(report.op_types)
        assert report.parity["max_abs_error"] <= 1e-3 and report.parity["cosine"] > 0.9999
    if quant == "int4-weight":
        assert not {"Gemm", "MatMul"} & set(report.op_types)  # both Linear layers are 4-bit, no fp32 fallback
        assert any("Conv" in note and "fp32" in note for note in report.notes)
    assert report.parity["samples"] == 64
    assert report.parity["top1_agreement"] >= 0.95 and report.parity["cosine"] >= 0.98
    # the graph classifies the held-out digits like the model does
    (logits,) = run_onnx(ort_session(data, 1), digits.test.tensors[0][:120])
    with torch.no_grad():
        expected = trained_lenet5(digits.test.tensors[0][:120]).argmax(1).numpy()
    assert (logits.argmax(1) == expected).mean() >= 0.97
    fp32_bytes = sum(p.numel() * 4 for p in trained_lenet5.parameters())
    limit = {"none": 1.01, "int8-static": 0.27, "int8-dynamic": 0.31, "int4-weight": 0.25}[quant]
    assert report.bytes <= limit * fp32_bytes


def test_fp16_graph_stores_half_weights_with_fp32_inputs(trained_lenet5, digits):
    report = export(trained_lenet5, None, ExportConfig(precision="fp16"), calib_data=digits)
    fp32 = export(trained_lenet5, None, calib_data=digits)
    assert onnx.TensorProto.FLOAT16 in _initializer_types(report.graph)
    assert report.bytes < 0.55 * fp32.bytes
    session = ort_session(report.graph, 1)
    assert session.get_inputs()[0].type == "tensor(float)"
    assert report.parity["top1_agreement"] >= 0.98 and report.parity["cosine"] > 0.999


def test_dynamic_batch_and_opset_for_the_runtime(trained_lenet5, digits):
    report = export(trained_lenet5, None, ExportConfig(quant="int4-weight"), calib_data=digits)
    assert report.opset == choose_opset() and 13 <= report.opset <= 17
    graph = onnx.load_from_string(report.graph)
    assert {op.domain: op.version for op in graph.opset_import}[""] == report.opset
    (out,) = run_onnx(ort_session(report.graph, 1), torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


# --- packed torchslim 4-bit layers -> MatMulNBits with the same codes and scales ---------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_int4_layers_export_their_own_codes_and_scales(trained_lenet5, digits, symmetric):
    model = copy.deepcopy(trained_lenet5)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32, symmetric=symmetric))
    linear = {name for name, m in model.named_modules() if type(m).__name__ == "IntQuantLayer" and m.op == "linear"}
    report = export(model, None, ExportConfig(quant="int4-weight", accuracy_level=0), calib_data=digits)
    assert sorted(report.packed_layers) == sorted(linear)
    # fp32 compute (accuracy_level 0): the graph reproduces the packed model, not just the fp32 one
    assert report.parity["max_abs_error"] <= 1e-4
    graph = onnx.load_from_string(report.graph)
    inits = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    for name in linear:
        layer = model.get_submodule(name)
        stem = name.replace(".", "_")
        np.testing.assert_array_equal(inits[f"{stem}_scales"], layer.scale.float().numpy().reshape(-1))
        assert (f"{stem}_zero_points" in inits) is not symmetric
        node = next(n for n in graph.graph.node if n.name == f"{stem}_MatMulNBits")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["block_size"] == 32 and attrs["bits"] == 4 and attrs["N"] == layer.weight_shape[0]
    # int8 compute (accuracy_level 4, the default) stays close
    fast = export(model, None, ExportConfig(quant="int4-weight"), calib_data=digits)
    assert fast.parity["top1_agreement"] >= 0.98 and fast.parity["cosine"] > 0.999


def test_packed_layers_that_do_not_fit_matmulnbits_are_requantized_and_reported(trained_lenet5, digits):
    model = copy.deepcopy(trained_lenet5)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=24))
    report = export(model, None, ExportConfig(quant="int4-weight"), calib_data=digits)
    assert report.packed_layers == []
    assert any("block of 24 inputs" in note and "re-quantized" in note for note in report.notes)
    assert report.op_types["MatMulNBits"] == 2


def test_packed_model_fp32_export_computes_the_packed_weights(trained_lenet5, digits):
    model = copy.deepcopy(trained_lenet5)
    ts.quantize_(model, ts.IntQuant(bits=3, granularity="channel"))
    report = export(model, None, calib_data=digits)
    assert report.parity["max_abs_error"] <= 1e-4  # against the 3-bit model: its dequantized weights are exported
    assert not QUANTIZED_OPS & set(report.op_types)


def test_structurally_pruned_model_exports_the_smaller_dense_graph(trained_lenet5, digits):
    model = copy.deepcopy(trained_lenet5)
    ts.prune_(model, ts.ChannelPruning(amount=0.5), example_inputs=digits.example_inputs(2))
    full = export(trained_lenet5, None, calib_data=digits)
    pruned = export(model, None, calib_data=digits)
    assert pruned.bytes < 0.6 * full.bytes
    assert pruned.parity["max_abs_error"] <= 1e-3


def test_onnx_graph_model_is_written_as_stored(trained_lenet5, digits, tmp_path):
    graph = ts.quantize_dynamic(trained_lenet5, example_inputs=digits.example_inputs(2))
    report = export(graph, tmp_path / "g.onnx", calib_data=digits)
    assert (tmp_path / "g.onnx").read_bytes() == graph.onnx_bytes()
    with pytest.raises(ConfigError, match="quant = 'int4-weight'.*already quantized"):
        export(graph, None, ExportConfig(quant="int4-weight"), calib_data=digits)
    assert report.parity["max_abs_error"] == 0.0


# --- a tiny transformer block -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("quant", "ops"),
    [
        ("none", set()),
        ("int8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
        ("int4-weight", {"MatMulNBits"}),
        ("int8-static", {"QuantizeLinear", "DequantizeLinear"}),
    ],
)
def test_transformer_block_every_mode(block, tokens, quant, ops):
    report = export(block, None, ExportConfig(quant=quant, min_agreement=0.0), calib_data=tokens)
    assert ops <= set(report.op_types)
    if quant in ("int8-dynamic", "int4-weight"):
        # all six projections (q, k, v, o, fc1, fc2) quantized: no fp32 MatMul with a constant weight left
        assert report.op_types["MatMulInteger" if quant == "int8-dynamic" else "MatMulNBits"] == 6
    assert report.parity["cosine"] >= (0.9999 if quant == "none" else 0.98)
    (out,) = run_onnx(ort_session(report.graph, 1), tokens[:3])
    assert out.shape == (3, 16, 64)


def test_transformer_fusion_then_dynamic_int8_quantizes_fused_attention(block, tokens):
    report = export(block, None, ExportConfig(quant="int8-dynamic", transformer_fusion=True, min_agreement=0.0),
                    calib_data=tokens)  # fmt: skip
    assert any(note.startswith("transformer fusion:") for note in report.notes)
    assert report.op_types["QAttention"] == 1 and report.op_types["MatMulInteger"] == 3  # o, fc1, fc2
    assert report.parity["cosine"] >= 0.98


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quant": "int3"}, r"quant = 'int3'.*'none', 'int8-static', 'int8-dynamic', 'int4-weight'"),
        ({"precision": "fp16", "quant": "int8-dynamic"}, "precision = 'fp16'"),
        ({"block_size": 24}, "block_size = 24.*power of two"),
        ({"accuracy_level": 5}, "accuracy_level = 5"),
        ({"min_cosine": 2.0}, "min_cosine = 2.0"),
        ({"quant": "int8-static", "static_ops": "conv"}, "static_ops = 'conv'.*'all', 'matmul'"),
        ({"static_ops": "matmul"}, "static_ops = 'matmul'.*int8-static only"),
        ({"quant": "int8-dynamic", "symmetric_activations": True}, "symmetric_activations = True.*int8-static only"),
        ({"quant": "int8-dynamic", "smooth_quant": 0.5}, "smooth_quant = 0.5.*int8-static only"),
        ({"quant": "int8-static", "smooth_quant": 2}, r"smooth_quant = 2 is invalid: expected a number in \(0, 1\]"),
        ({"quant": "int4-weight", "reduce_range": False}, "reduce_range = False.*int8 modes only"),
        ({"quant": "int8-dynamic", "reduce_range": 0}, "reduce_range = 0.*True or False"),
    ],
)
def test_bad_config_names_field_value_and_range(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExportConfig(**kwargs)


def test_static_needs_calibration_and_inputs_are_required(block, tmp_path):
    with pytest.raises(ConfigError, match="int8-static' needs calib_data"):
        export(block, tmp_path / "x.onnx", ExportConfig(quant="int8-static"), example_inputs=torch.randn(1, 4, 64))
    with pytest.raises(DataError, match="example_inputs is missing"):
        export(block, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_parity_failure_is_loud_with_numbers_and_writes_nothing(trained_lenet5, digits, tmp_path):
    path = tmp_path / "strict.onnx"
    with pytest.raises(TorchSlimError, match=r"parity check failed on 64 sample\(s\).*cosine = 0\.\d+ \(allowed >= 1"):
        export(trained_lenet5, path, ExportConfig(quant="int4-weight", min_cosine=1.0), calib_data=digits)
    assert not path.exists()


def test_convolutional_model_has_nothing_for_int4(digits):
    model = ts.create_model("student_cnn").eval()
    model[-1] = nn.Identity()  # no Linear layer left
    with pytest.raises(TorchSlimError, match="no Linear layer"):
        export(model, None, ExportConfig(quant="int4-weight", min_agreement=0.0), calib_data=digits)

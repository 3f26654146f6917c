"""Static and dynamic int8 run by ONNX Runtime: accurate, physically smaller, really int8, saved and reloaded."""

import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim as ts
from torchslim.config import Config
from torchslim.errors import ConfigError, DataError, MissingDependencyError, ModelError
from torchslim.export import graph_op_types, optimized_op_types
from torchslim.models.onnx_graph import OnnxGraph
from torchslim.quantize import int8
from torchslim.quantize.int8 import (
    DynamicInt8,
    StaticInt8,
    calibration_inputs,
    quantize_dynamic,
    quantize_static,
)
from torchslim.quantize.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    create_observer,
)
from torchslim.train import RECOMMENDED, evaluate, train

LENET5_PARAMETERS = 431_080
LENET300_PARAMETERS = 266_610


@pytest.fixture(scope="module")
def digits():
    return ts.load_data("digits")


def _trained(name, epochs, digits, tmp_path_factory):
    torch.manual_seed(0)
    model = ts.create_model(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and immune to a busy machine
    try:
        train(model, digits.train, RECOMMENDED[name].replace(epochs=epochs))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    path = tmp_path_factory.mktemp(name) / "fp32.slim"
    ts.save(model, path)
    return model, evaluate(model, digits.test), path.stat().st_size


@pytest.fixture(scope="module")
def lenet5(digits, tmp_path_factory):
    """lenet5 trained on digits (4 of the recommended 12 epochs already give ~97%)."""
    model, accuracy, fp32_bytes = _trained("lenet5", 4, digits, tmp_path_factory)
    assert accuracy >= 0.95
    return model, accuracy, fp32_bytes


@pytest.fixture(scope="module")
def lenet300(digits, tmp_path_factory):
    model, accuracy, fp32_bytes = _trained("lenet300", 6, digits, tmp_path_factory)
    assert accuracy >= 0.93
    return model, accuracy, fp32_bytes


@pytest.fixture(scope="module", params=["minmax", "percentile", "mse"])
def static_graph(request, lenet5, digits):
    model = lenet5[0]
    return request.param, quantize_static(model, digits, StaticInt8(observer=request.param))


# --- static int8 --------------------------------------------------------------------------------
def test_static_int8_keeps_accuracy_within_one_point(static_graph, lenet5, digits):
    observer, graph = static_graph
    fp32_accuracy = lenet5[1]
    assert evaluate(graph, digits.test) >= fp32_accuracy - 0.01
    assert graph.runtime == "onnxruntime"
    assert graph.parity["top1_agreement"] >= 0.9 and graph.parity["samples"] == 256
    assert graph.skipped == {}
    assert graph.quantization == StaticInt8(observer=observer).to_dict()


def test_static_int8_file_is_physically_smaller(static_graph, lenet5, tmp_path):
    _, graph = static_graph
    path = ts.save(graph, tmp_path / "int8.slim")
    assert path.stat().st_size <= 0.30 * lenet5[2]
    stats = graph.slim_stats()
    assert stats["parameters"] == LENET5_PARAMETERS  # int8 weights + int32 biases, no scales
    assert stats["storage_bits"] == 8 * graph.graph.numel()


def test_static_int8_graph_runs_int8_kernels(static_graph):
    _, graph = static_graph
    data = graph.onnx_bytes()
    stored = graph_op_types(data)
    assert stored["QuantizeLinear"] >= 4 and stored["DequantizeLinear"] >= 8
    model = onnx.load_from_string(data)
    weights = [i for i in model.graph.initializer if i.name.endswith("weight_quantized")]
    assert len(weights) == 4 and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    executed = optimized_op_types(data)
    assert executed["QLinearConv"] == 2 and executed["QGemm"] == 2
    assert "Conv" not in executed and "Gemm" not in executed


def test_static_int8_round_trips_through_slim(static_graph, digits, tmp_path):
    _, graph = static_graph
    path = ts.save(graph, tmp_path / "int8.slim")
    loaded = ts.load(path)
    assert isinstance(loaded, OnnxGraph) and loaded.quantization == graph.quantization
    x = digits.test.tensors[0][:40]
    assert torch.equal(loaded(x), graph(x))
    manifest = ts.read_manifest(path)
    assert manifest["factory"]["name"] == "torchslim.models:onnx_graph"
    assert manifest["factory"]["kwargs"]["source_factory"]["name"] == "torchslim.models:lenet5"


def test_static_int8_loads_identically_in_a_fresh_process(lenet5, digits, tmp_path):
    graph = quantize_static(lenet5[0], digits, StaticInt8(calibration_samples=64))
    path = ts.save(graph, tmp_path / "int8.slim")
    x = digits.test.tensors[0][:25]
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, torch, torchslim as ts\n"
        f"model = ts.load({str(path)!r})\n"
        "assert 'onnxruntime' not in sys.modules  # loading does not start a runtime\n"
        f"out = model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out.numpy())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert np.array_equal(np.load(tmp_path / "out.npy"), graph(x).numpy())


def test_per_channel_and_symmetric_options_change_the_graph(lenet5, digits):
    model = lenet5[0]
    per_tensor = quantize_static(model, digits, StaticInt8(per_channel=False, calibration_samples=64))
    symmetric = quantize_static(model, digits, StaticInt8(symmetric_activations=True, calibration_samples=64))

    def scales(graph):
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(graph.onnx_bytes()).graph.initializer}
        return inits["0.weight_scale"].size, inits

    assert scales(per_tensor)[0] == 1
    size, inits = scales(symmetric)
    assert size == 20  # one scale per output channel of conv 0 (the default)
    activation_zero_points = [
        v for k, v in inits.items() if k.endswith("zero_point") and "weight" not in k and "bias" not in k
    ]
    # zero point 0 everywhere: int8 for signed tensors, uint8 for the ReLU outputs (see the lopsided test below)
    assert activation_zero_points and not any(v.any() for v in activation_zero_points)
    assert {v.dtype.name for v in activation_zero_points} == {"int8", "uint8"}
    assert evaluate(symmetric, digits.test) >= lenet5[1] - 0.01


class _Attention(nn.Module):
    """One attention head and a GELU MLP: signed, lopsided (GELU, Softmax) and activation x activation products."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(-1, -2) / 6.0, dim=-1) @ v
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def _activation_types(graph) -> dict[str, tuple[str, bool, str]]:
    """For each MatMul/Gemm input that is a rounded activation: (its integer type, zero point == 0, source op)."""
    model = onnx.load_from_string(graph.onnx_bytes()).graph
    inits = {i.name: numpy_helper.to_array(i) for i in model.initializer}
    producer = {out: node for node in model.node for out in node.output}
    found = {}
    for node in model.node:
        for slot, name in enumerate(node.input[:2]):
            dq = producer.get(name)
            if node.op_type in ("MatMul", "Gemm") and dq is not None and dq.op_type == "DequantizeLinear" \
                    and dq.input[0] not in inits:
                zero = inits[dq.input[2]]
                source = producer.get(producer[dq.input[0]].input[0])
                found[f"{node.name}:{slot}"] = (zero.dtype.name, not zero.any(), getattr(source, "op_type", "input"))
    return found


def test_symmetric_activations_give_lopsided_tensors_uint8_and_asymmetric_ones_int8_right_operands():
    # int8 kernels multiply uint8 by int8; symmetric int8 wastes half its grid on GELU/Softmax outputs
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(64, 16, 32)
    ops = {}
    for symmetric in (True, False):
        config = StaticInt8(ops="matmul", symmetric_activations=symmetric, calibration_samples=64)
        graph = quantize_static(model, x, config, min_agreement=0.0)
        ops[symmetric] = _activation_types(graph)
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(), dim=0) > 0.999
    signed, gelu = "/fc1/MatMul:0", "/fc2/MatMul:0"  # residual stream, GELU (P @ V stays float: see below)
    assert ops[True][signed][:2] == ("int8", True)
    assert ops[True][gelu][:2] == ("uint8", False)
    rights = [key for key in ops[True] if key.endswith(":1")]  # Q @ K^T
    assert rights == ["/MatMul:1"] and all(ops[sym]["/MatMul:1"][:2] == ("int8", True) for sym in (True, False))
    assert all(ops[False][key][0] == "uint8" for key in ops[False] if key not in rights)  # asymmetric: uint8


@pytest.mark.parametrize("observer", ["minmax", "mean-minmax", "percentile", "mse"])
def test_observer_ranges_reach_the_graph(lenet5, digits, observer):
    """The input's quantization scale is exactly the range our observer picks, over 255 steps."""
    config = StaticInt8(observer=observer, percentile=99.0, calibration_samples=128)
    graph = quantize_static(lenet5[0], digits, config)
    expected = create_observer(observer, percentile=99.0)
    inputs = calibration_inputs(digits, 128)
    for sample in inputs.split(1) if observer == "mean-minmax" else [inputs]:  # mean-minmax: one sample per update
        expected.update(sample)
    lo, hi = expected.compute_range()
    model = onnx.load_from_string(graph.onnx_bytes()).graph
    inits = {i.name: numpy_helper.to_array(i) for i in model.initializer}
    (quantize_input,) = [n for n in model.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
    assert float(inits[quantize_input.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-5)


@pytest.mark.parametrize(("reduce_range", "bound"), [(True, 64), (False, 128)])
def test_static_int8_weights_use_7_bits_unless_told_otherwise(lenet5, digits, reduce_range, bound):
    # int8 products saturate ONNX Runtime's 16-bit sums on CPUs without VNNI (a ResNet-18: cosine 0.99968 -> 0.99989)
    config = StaticInt8(reduce_range=reduce_range, calibration_samples=32)
    graph = quantize_static(lenet5[0], digits, config)
    model = onnx.load_from_string(graph.onnx_bytes()).graph
    weights = [numpy_helper.to_array(i) for i in model.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_quantized")]
    assert weights
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert bound // 2 < largest <= bound


class _PostNormBlocks(nn.Module):
    """Post-norm residual blocks, as BERT's: x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, dim: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.ModuleList(nn.Linear(dim, 4 * dim) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(4 * dim, dim) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc1, fc2, norm in zip(self.fc1, self.fc2, self.norms, strict=True):
            x = norm(x + fc2(nn.functional.gelu(fc1(x))))
        return x


def test_static_int8_graph_outputs_keep_the_float_result(lenet5, digits, static_graph):
    # ORT rounded the logits of the last Gemm to int8 too (ResNet-18 by OpenVINO: cosine 0.99995 -> 0.99997 without)
    matmul_only = quantize_static(lenet5[0], digits, StaticInt8(ops="matmul", calibration_samples=32))
    for graph in (static_graph[1], matmul_only):
        model = onnx.load_from_string(graph.onnx_bytes()).graph
        producer = {out: node for node in model.node for out in node.output}
        (output,) = model.output
        assert producer[output.name].op_type == "Gemm"
        assert graph.parity["top1_agreement"] >= 0.97


def test_matmul_only_static_int8_rounds_the_matmul_inputs_and_nothing_else():
    # ORT's quantizer hands the rounded LayerNorm output to the residual Add too: the residual stream was rounded at
    # every layer (a BERT-shaped encoder: cosine 0.99943 to fp32, 0.99995 with only the MatMul inputs rounded)
    torch.manual_seed(0)
    model = _PostNormBlocks().eval()
    x = torch.randn(64, 16, 32)
    config = StaticInt8(ops="matmul", symmetric_activations=True, observer="percentile", calibration_samples=64)
    graph = quantize_static(model, x, config, min_agreement=0.0)
    nodes = onnx.load_from_string(graph.onnx_bytes()).graph.node
    producer = {out: node for node in nodes for out in node.output}

    def rounded(name: str) -> bool:  # an activation through QuantizeLinear -> DequantizeLinear
        dq = producer.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" and getattr(
            producer.get(dq.input[0]), "op_type", None) == "QuantizeLinear"

    matmuls = [n for n in nodes if n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == 6 and all(rounded(n.input[0]) for n in matmuls)
    floats = [n for n in nodes if n.op_type not in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear")]
    assert {n.op_type for n in floats} >= {"Add", "LayerNormalization"}
    assert not [(n.op_type, i) for n in floats for i in n.input if rounded(i)]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(), dim=0)
    assert cosine >= 0.9995


def test_matmul_only_static_int8_leaves_the_attention_probabilities_product_float():
    # NNCF's transformer placement: P @ V reads float probabilities and values; Q @ K^T is int8
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(64, 16, 32)
    graph = quantize_static(model, x, StaticInt8(ops="matmul", symmetric_activations=True, calibration_samples=64),
                            min_agreement=0.0)
    rounded = _activation_types(graph)
    assert "/MatMul_1:0" not in rounded and "/MatMul_1:1" not in rounded  # P @ V
    assert {"/MatMul:0", "/MatMul:1", "/fc1/MatMul:0", "/fc2/MatMul:0"} <= set(rounded)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(), dim=0) > 0.999


class _OutlierChannels(nn.Module):
    """A pre-norm MLP whose LayerNorm gives 3 of 64 channels 40x the others' scale (as in LLMs), and a Linear
    that reads a tensor a residual addition reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.norm.weight[:3] = 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return h + self.fc3(h)


def test_smooth_quant_flattens_outlier_channels_and_keeps_the_float_graph_exact():
    from torchslim.onnx.convert import export_onnx
    from torchslim.onnx.runtime import ort_session
    from torchslim.quantize.smoothquant import smooth_graph

    torch.manual_seed(0)
    model = _OutlierChannels().eval()
    x = torch.randn(32, 16, 64)
    proto = onnx.load_from_string(export_onnx(model, x[:1]))
    before = ort_session(proto.SerializeToString()).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    muls = sum(n.op_type == "Mul" for n in proto.graph.node)
    done = smooth_graph(proto, x, alpha=0.8, step=8)
    after = ort_session(proto.SerializeToString()).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    assert np.allclose(after, before, rtol=1e-4, atol=1e-4)
    assert sorted(done.values()) == [1, 1, 1]  # fc1, fc2 and fc3 each read one smoothed activation
    # the LayerNorm absorbs its division (only fc1 reads it); fc3's input is also the residual: a Mul for it, and
    # one for fc2's input (a Relu output)
    assert sum(n.op_type == "Mul" for n in proto.graph.node) == muls + 2
    norm = next(n for n in proto.graph.node if n.op_type == "LayerNormalization")
    weight = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == norm.input[1]))
    assert weight[:3].max() / weight[3:].max() < 40 / 2  # the outlier channels' scale moved into fc1's weight

    cosines = {}
    for alpha in (None, 0.8):
        config = StaticInt8(ops="matmul", symmetric_activations=True, observer="minmax", calibration_samples=32,
                            smooth_quant=alpha)
        graph = quantize_static(model, x, config, min_agreement=0.0)
        with torch.no_grad():
            cosines[alpha] = float(torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(),
                                                                         dim=0))
    assert 1 - cosines[0.8] < 0.5 * (1 - cosines[None])


def test_static_int8_rejects_bad_inputs_before_any_work(lenet5, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("exported although the input was invalid")

    monkeypatch.setattr(int8, "export_onnx", fail)
    empty = TensorDataset(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long))
    with pytest.raises(DataError, match="calibration data is empty"):
        quantize_static(lenet5[0], empty)
    with pytest.raises(DataError, match="calibration data is a str"):
        quantize_static(lenet5[0], "digits")
    with pytest.raises(ConfigError, match="config = DynamicInt8 is invalid: expected StaticInt8"):
        quantize_static(lenet5[0], torch.randn(4, 1, 28, 28), DynamicInt8())


def test_calibration_inputs_accepts_the_usual_containers(digits):
    x = digits.train.tensors[0]
    assert torch.equal(calibration_inputs(digits, 10), x[:10])  # DataSplits: the train split
    assert torch.equal(calibration_inputs(DataLoader(digits.train, batch_size=3), 10), x[:10])
    assert torch.equal(calibration_inputs(x[:5], 10), x[:5])
    assert calibration_inputs(digits.train, 7).shape == (7, 1, 28, 28)


def test_missing_onnxruntime_gives_the_pip_hint(lenet5, static_graph, monkeypatch):
    copied = copy.deepcopy(static_graph[1])  # a copy holds no session: its forward must import onnxruntime
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        quantize_static(lenet5[0], torch.randn(4, 1, 28, 28))
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        quantize_dynamic(lenet5[0], example_inputs=torch.randn(1, 1, 28, 28))
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        copied(torch.randn(1, 1, 28, 28))


def test_deepcopy_of_a_running_graph_works(static_graph, digits):
    graph = static_graph[1]
    x = digits.test.tensors[0][:8]
    before = graph(x)  # the session exists now
    copied = copy.deepcopy(graph)
    assert copied._session is None
    assert torch.equal(copied(x), before)


# --- dynamic int8 -------------------------------------------------------------------------------
def test_dynamic_int8_keeps_accuracy_and_uses_integer_matmuls(lenet300, digits, tmp_path):
    model, fp32_accuracy, fp32_bytes = lenet300
    graph = quantize_dynamic(model, example_inputs=digits.example_inputs(4))
    assert evaluate(graph, digits.test) >= fp32_accuracy - 0.01
    assert graph.runtime == "onnxruntime" and graph.skipped == {}
    stored = graph_op_types(graph.onnx_bytes())
    assert stored["MatMulInteger"] == 3 and stored["DynamicQuantizeLinear"] == 3
    assert "Gemm" not in stored and "MatMul" not in stored
    assert optimized_op_types(graph.onnx_bytes())["DynamicQuantizeMatMul"] == 3
    assert graph.slim_stats()["parameters"] == LENET300_PARAMETERS
    path = ts.save(graph, tmp_path / "dyn.slim")
    assert path.stat().st_size <= 0.30 * fp32_bytes
    x = digits.test.tensors[0][:16]
    assert torch.equal(ts.load(path)(x), graph(x))


@pytest.mark.parametrize(("per_channel", "sizes"), [(False, [1, 1, 1]), (True, [300, 100, 10])])
def test_dynamic_int8_scales_per_tensor_or_per_channel(lenet300, digits, per_channel, sizes):
    config = DynamicInt8(per_channel=per_channel)
    graph = quantize_dynamic(lenet300[0], config, example_inputs=digits.example_inputs(1))
    model = onnx.load_from_string(graph.onnx_bytes()).graph
    scales = [numpy_helper.to_array(i) for i in model.initializer if "weight" in i.name and i.name.endswith("_scale")]
    assert [s.size for s in scales] == sizes


@pytest.mark.parametrize(("reduce_range", "bound"), [(True, 64), (False, 128)])
def test_dynamic_int8_weights_use_7_bits_unless_told_otherwise(lenet300, digits, reduce_range, bound):
    # 8-bit weights times uint8 activations saturate ONNX Runtime's 16-bit sums on CPUs without VNNI
    config = DynamicInt8(reduce_range=reduce_range)
    graph = quantize_dynamic(lenet300[0], config, example_inputs=digits.example_inputs(1))
    model = onnx.load_from_string(graph.onnx_bytes()).graph
    weights = [numpy_helper.to_array(i) for i in model.initializer if i.name.endswith("_quantized")]
    assert weights and all(w.dtype == np.int8 for w in weights)
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert bound // 2 < largest <= bound


def test_dynamic_int8_keeps_an_attention_model_close_to_fp32():
    # cosine 0.986 with 8-bit weights on an AVX2 CPU (coverage table, 2026-12-03); >= 0.999 with 7-bit ones
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    model = _SelfAttention(attention)
    x = torch.randn(2, 10, 64) * 3
    graph = quantize_dynamic(model, example_inputs=x)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(graph(x).flatten(), model(x).flatten(), dim=0)
    assert cosine >= 0.99


class _SelfAttention(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_dynamic_int8_lists_the_convolutions_it_leaves_in_fp32(lenet5, digits):
    graph = quantize_dynamic(lenet5[0], example_inputs=digits.example_inputs(1))
    assert len(graph.skipped) == 2
    assert all("Conv stays fp32" in reason for reason in graph.skipped.values())
    assert graph_op_types(graph.onnx_bytes())["MatMulInteger"] == 2


def test_dynamic_int8_needs_a_linear_layer():
    convolutional = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    with pytest.raises(ModelError, match="has no Linear layer"):
        quantize_dynamic(convolutional, example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(DataError, match="example_inputs"):
        quantize_dynamic(convolutional, example_inputs=torch.empty(0, 1, 8, 8))


# --- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StaticInt8(observer="kl"), r"StaticInt8.observer = 'kl' is invalid: expected one of 'minmax'"),
        (lambda: StaticInt8(percentile=50), r"StaticInt8.percentile = 50 is invalid: expected a number in \(50, 100\]"),
        (lambda: StaticInt8(percentile=100.5), r"StaticInt8.percentile = 100.5 is invalid"),
        (lambda: StaticInt8(calibration_samples=0), r"calibration_samples = 0 is invalid: expected an integer >= 1"),
        (lambda: StaticInt8(calibration_samples=2.5), r"calibration_samples = 2.5 is invalid"),
        (lambda: StaticInt8(per_channel="yes"), r"StaticInt8.per_channel = 'yes' is invalid: expected True or False"),
        (lambda: StaticInt8(symmetric_activations=1), r"symmetric_activations = 1 is invalid"),
        (lambda: StaticInt8(reduce_range=0), r"StaticInt8.reduce_range = 0 is invalid: expected True or False"),
        (lambda: StaticInt8(smooth_quant=0), r"StaticInt8.smooth_quant = 0 is invalid: expected a number in \(0, 1\]"),
        (lambda: StaticInt8(smooth_quant=1.5), r"StaticInt8.smooth_quant = 1.5 is invalid"),
        (lambda: DynamicInt8(per_channel=None), r"DynamicInt8.per_channel = None is invalid"),
        (lambda: DynamicInt8(reduce_range="no"), r"DynamicInt8.reduce_range = 'no' is invalid: expected True or False"),
    ],
)
def test_config_errors_name_field_value_and_range(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_configs_round_trip_through_dicts():
    for config in (StaticInt8(observer="mse", percentile=99.9, calibration_samples=32), DynamicInt8(per_channel=False)):
        assert Config.from_dict(config.to_dict()) == config
    assert StaticInt8().to_dict()["type"] == "int8-static" and DynamicInt8().to_dict()["type"] == "int8-dynamic"


# --- observers ----------------------------------------------------------------------------------
def test_minmax_and_percentile_ranges():
    values = np.random.default_rng(0).uniform(-1.0, 3.0, size=200_000)
    minmax = MinMaxObserver()
    percentile = PercentileObserver(99.0)
    for chunk in np.array_split(values, 7):  # several batches: the histogram grows and re-bins
        minmax.update(chunk)
        percentile.update(torch.from_numpy(chunk))
    assert minmax.compute_range() == (values.min(), values.max())
    lo, hi = percentile.compute_range()
    assert lo == pytest.approx(np.percentile(values, 1.0), abs=0.01)
    assert hi == pytest.approx(np.percentile(values, 99.0), abs=0.01)
    symmetric = PercentileObserver(99.0, symmetric=True)
    symmetric.update(values)
    lo, hi = symmetric.compute_range()
    assert lo == -hi and hi == pytest.approx(np.percentile(np.abs(values), 99.0), abs=0.01)


def _fake_quant_mse(values, lo, hi, steps=255):
    scale = (hi - lo) / steps
    zero = np.round(-lo / scale)
    q = np.clip(np.round(values / scale) + zero, 0, steps)
    return float(np.mean((values - (q - zero) * scale) ** 2))


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).laplace(size=200_000),
        np.concatenate([np.random.default_rng(2).normal(size=100_000), [40.0, -35.0]]),  # two far outliers
    ],
    ids=["laplace", "normal-with-outliers"],
)
def test_mse_observer_finds_the_range_with_the_least_real_error(values):
    mse = MSEObserver()
    for chunk in np.array_split(values, 3):
        mse.update(chunk)
    lo, hi = mse.compute_range()
    assert values.min() < lo < 0.0 < hi < values.max()  # clipped on both sides
    fractions = np.linspace(0.02, 1.0, 50)
    brute_force = min(_fake_quant_mse(values, values.min() * a, values.max() * b) for a in fractions for b in fractions)
    chosen = _fake_quant_mse(values, lo, hi)
    assert chosen <= 1.02 * brute_force
    assert chosen < 0.85 * _fake_quant_mse(values, values.min(), values.max())
    # the search's own estimate agrees with the simulation
    assert mse.quantization_error(lo, hi) / values.size == pytest.approx(chosen, rel=0.05)


def test_mean_minmax_averages_each_samples_extremes():
    observer = create_observer("mean-minmax")
    for sample in ([-1.0, 2.0], [-3.0, 4.0], [-2.0, 30.0]):  # the last sample's outlier moves the range by a third
        observer.update(torch.tensor(sample))
    assert observer.compute_range() == (-2.0, 12.0)
    symmetric = create_observer("mean-minmax", symmetric=True)
    symmetric.update(np.array([0.5, 1.0]))
    assert symmetric.compute_range() == (-1.0, 1.0)  # the range holds zero, then is made symmetric


def test_relu_zeros_are_free_and_ranges_contain_zero():
    relu = np.maximum(np.random.default_rng(2).normal(size=50_000), 0.0) + 0.0
    for observer in (MinMaxObserver(), PercentileObserver(), MSEObserver()):
        observer.update(relu)
        lo, hi = observer.compute_range()
        assert lo == 0.0 and 0.0 < hi <= relu.max()
    positive = MinMaxObserver()
    positive.update(np.array([2.0, 3.0]))
    assert positive.compute_range() == (0.0, 3.0)


def test_observer_errors():
    with pytest.raises(DataError, match="observed no values"):
        MSEObserver().compute_range()
    with pytest.raises(DataError, match="1 NaN/Inf value"):
        MinMaxObserver().update(np.array([1.0, np.nan]))
    with pytest.raises(ConfigError, match="observer = 'kl' is invalid"):
        create_observer("kl")
    with pytest.raises(ConfigError, match=r"percentile = 40 is invalid: expected a number in \(50, 100\]"):
        PercentileObserver(40)


@settings(max_examples=40, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e3, 1e3)),
    name=st.sampled_from(["minmax", "percentile", "mse"]),
    symmetric=st.booleans(),
)
def test_every_range_holds_zero_and_stays_inside_the_data(values, name, symmetric):
    observer = create_observer(name, symmetric=symmetric)
    observer.update(values)
    lo, hi = observer.compute_range()
    bound = max(abs(min(values.min(), 0.0)), max(values.max(), 0.0))
    assert lo <= 0.0 <= hi
    if symmetric:
        assert lo == -hi and hi <= bound * (1 + 1e-9)
    else:
        assert min(values.min(), 0.0) * (1 + 1e-9) <= lo and hi <= max(values.max(), 0.0) * (1 + 1e-9)


def test_static_min_agreement_is_validated_before_work():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="min_agreement = 1.5"):
        quantize_static(model, torch.randn(4, 4), min_agreement=1.5)

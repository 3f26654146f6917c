"""deploy: every route is checked and timed beside the fp32 baseline; the fastest valid one is written."""

import copy
import json
import math

import pytest
import torch

import torchslim as ts
from torchslim import deployment
from torchslim.artifact import input_signature
from torchslim.errors import ConfigError, TorchSlimError


@pytest.fixture(scope="module")
def int4_file(trained_lenet5, digits, tmp_path_factory):
    model = copy.deepcopy(trained_lenet5)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="channel"))
    path = tmp_path_factory.mktemp("deploy") / "lenet5-int4.slim"
    ts.save(model, path, input_signature=input_signature(digits.example_inputs(1)))
    return path


def test_deploy_writes_the_fastest_valid_route_and_the_table(int4_file, digits, trained_lenet5, tmp_path,
                                                             int8mm_timed):
    int8mm_timed(dense_ms=2.0, int8mm_ms=1.0)  # torch-w8a8 applies only where the int8 product is faster
    report = ts.deploy(int4_file, tmp_path / "out", data=digits, reference=trained_lenet5, min_run_time=0.05)
    names = [r.name for r in report.routes]
    assert names == list(deployment.DEFAULT_ROUTES)
    valid = [r for r in report.routes if r.status == "ok"]
    assert "ts.load(path, runtime='compact')" in report.route("torch-compact").reason
    expected = {"torch", "torch-compact", "torch-w8a8", "onnxruntime-fp32", "onnxruntime-int8-static",
                "openvino-fp32", "openvino-int8-static", "openvino-int8-matmul"}
    assert expected <= {r.name for r in valid}
    for route in valid:  # every valid route was timed at both batch sizes, beside the baseline, and kept accuracy
        assert set(route.speedup) == {1, 32}
        assert route.accuracy is not None and route.accuracy >= report.model_accuracy - 0.005
    geo = {r.name: math.fsum(math.log(s) for s in r.speedup.values()) for r in valid}
    assert report.chosen == max(geo, key=geo.get)
    written = tmp_path / "out" / ("model.slim" if report.chosen.startswith("torch") else "model.onnx")
    assert report.path == str(written) and written.stat().st_size == report.best.artifact_bytes
    saved = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert saved["chosen"] == report.chosen and len(saved["routes"]) == len(names)
    table = (tmp_path / "out" / "deploy.md").read_text()
    assert f"**{report.chosen}**" in table and "onnxruntime-int4" in table
    # the written artifact reproduces the model's predictions
    model = ts.load(int4_file)
    deployed = ts.OnnxGraph.from_bytes(written.read_bytes()) if written.suffix == ".onnx" else ts.load(written)
    x = digits.test.tensors[0][:64]
    with torch.inference_mode():
        agree = (model(x).argmax(1) == deployed(x).argmax(1)).float().mean()
    assert agree >= 0.95
    with pytest.raises(TorchSlimError, match="already holds a deployment"):
        ts.deploy(int4_file, tmp_path / "out", data=digits, routes=["torch"])


def test_a_route_that_fails_parity_is_rejected_and_nothing_is_written(int4_file, digits, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TorchSlimError("export (int8-dynamic, fp32): top-1 agreement 0.5 < 0.9")

    monkeypatch.setattr(deployment, "export", broken)
    report = ts.deploy(int4_file, data=digits, routes=["torch", "onnxruntime-int8-dynamic"], min_run_time=0.02)
    rejected = report.route("onnxruntime-int8-dynamic")
    assert rejected.status == "rejected" and "agreement 0.5" in rejected.reason and not rejected.speedup
    assert report.chosen == "torch"
    with pytest.raises(TorchSlimError, match="no route is valid.*agreement 0.5"):
        ts.deploy(int4_file, tmp_path / "none", data=digits, routes=["onnxruntime-int8-dynamic"])
    assert not (tmp_path / "none").exists()


def test_openvino_routes_say_what_to_install_when_it_is_missing(int4_file, digits, monkeypatch):
    monkeypatch.setattr(deployment, "openvino_available", lambda: False)
    report = ts.deploy(int4_file, data=digits, routes=["torch", "openvino-fp32"], batch_sizes=[1], min_run_time=0.02)
    route = report.route("openvino-fp32")
    assert route.status == "not applicable" and "pip install openvino" in route.reason


def test_openvino_runs_the_exported_graph_like_the_model(int4_file, digits):
    report = ts.deploy(int4_file, data=digits, routes=["openvino-fp32", "openvino-int8-static"], batch_sizes=[1],
                       min_run_time=0.02)
    fp32, int8 = report.route("openvino-fp32"), report.route("openvino-int8-static")
    assert fp32.status == "ok" and fp32.parity["cosine"] > 0.9999 and fp32.parity["top1_agreement"] == 1.0
    assert int8.status == "ok" and int8.parity["cosine"] > 0.98 and int8.parity["samples"] == 64


def test_the_matmul_route_gives_int8_to_matmul_and_gemm_only(int4_file, digits):
    import onnx

    report = ts.deploy(int4_file, data=digits, routes=["openvino-int8-matmul"], batch_sizes=[1], min_run_time=0.02)
    route = report.route("openvino-int8-matmul")
    assert route.status == "ok" and route.parity["cosine"] > 0.98
    assert "SmoothQuant alpha 0.8" in route.reason
    proto = onnx.load_from_string(route.payload)
    producer = {output: node.op_type for node in proto.graph.node for output in node.output}
    computing = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    for node in computing:  # int8 inputs (a DequantizeLinear in front) exactly for MatMul/Gemm
        assert (producer.get(node.input[0]) == "DequantizeLinear") == (node.op_type != "Conv"), node.op_type


@pytest.mark.parametrize(("int8_dot", "bound", "words"), [(True, 128, "8-bit"), (False, 64, "7-bit")])
def test_int8_routes_keep_8_bit_weights_only_on_a_cpu_with_an_int8_dot_product(int4_file, digits, monkeypatch,
                                                                                int8_dot, bound, words):
    # 7-bit weights guard x86 CPUs without VNNI against saturated 16-bit sums; with VNNI they only cost accuracy
    # (ResNet-18 by OpenVINO: cosine 0.99995 with 8 bits vs 0.99989 with 7)
    import onnx

    monkeypatch.setattr(deployment, "cpu_has_int8_dot_product", lambda: int8_dot)
    assert deployment.route_export_config("openvino-int8-static").reduce_range is not int8_dot
    assert deployment.route_export_config("onnxruntime-fp32").reduce_range  # not an int8 mode: unchanged
    report = ts.deploy(int4_file, data=digits, routes=["onnxruntime-int8-static"], batch_sizes=[1], min_run_time=0.02)
    route = report.route("onnxruntime-int8-static")
    assert route.status == "ok" and f"{words} int8 weights" in route.reason
    weights = [onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(route.payload).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_quantized")]
    assert bound // 2 < max(int(abs(w.astype(int)).max()) for w in weights) <= bound


def test_route_export_config_names_the_onnx_routes():
    with pytest.raises(ConfigError, match="route = 'torch' is invalid: expected one of onnxruntime-fp32"):
        deployment.route_export_config("torch")


def test_the_w8a8_route_is_the_same_file_loaded_with_int8_activations(int4_file, digits, trained_lenet5, tmp_path,
                                                                      int8mm_timed):
    int8mm_timed(dense_ms=2.0, int8mm_ms=1.0)
    report = ts.deploy(int4_file, data=digits, routes=["torch-w8a8"], batch_sizes=[8], min_run_time=0.02)
    route = report.route("torch-w8a8")
    assert route.status == "ok" and "ts.load(path, runtime='w8a8')" in route.reason
    assert 0.999 < route.parity["cosine"] and route.parity["max_abs_error"] > 0  # rounded, not bit-equal
    assert route.payload == int4_file.read_bytes()  # the file itself: the policy is chosen at load
    grouped = copy.deepcopy(trained_lenet5)
    ts.quantize_(grouped, ts.IntQuant(bits=4, granularity="group", group_size=16))
    report = ts.deploy(grouped, data=digits, reference=trained_lenet5, routes=["torch", "torch-w8a8"],
                       batch_sizes=[1], min_run_time=0.02)
    assert report.route("torch-w8a8").status == "not applicable"


def test_the_w8a8_route_does_not_apply_where_the_int8_product_is_slower(int4_file, digits, int8mm_timed):
    int8mm_timed(dense_ms=1.0, int8mm_ms=37.0)
    report = ts.deploy(int4_file, data=digits, routes=["torch", "torch-w8a8"], batch_sizes=[8], min_run_time=0.02)
    route = report.route("torch-w8a8")
    assert route.status == "not applicable" and "no layer takes the int8 product here" in route.reason
    assert "the fp32 layer is faster here" in route.reason


def test_a_route_over_the_accuracy_budget_is_rejected(int4_file, digits, monkeypatch):
    real = deployment.evaluate
    calls = []

    def lossy(module, data):  # the second evaluation is the route's: 2 points below the model
        calls.append(module)
        return real(module, data) - (0.02 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(deployment, "evaluate", lossy)
    report = ts.deploy(int4_file, data=digits, routes=["onnxruntime-fp32"], max_accuracy_drop=5, min_run_time=0.02)
    assert report.route("onnxruntime-fp32").status == "ok"
    calls.clear()
    with pytest.raises(TorchSlimError, match=r"2\.00 points below the model's .* \(budget 0\.5\)"):
        ts.deploy(int4_file, data=digits, routes=["onnxruntime-fp32"], min_run_time=0.02)


def test_the_recorded_input_signature_replaces_data(int4_file, tmp_path):
    manifest = ts.read_manifest(int4_file)
    assert manifest["input"] == {"shape": [1, 28, 28], "dtype": "float32"}
    loaded = ts.load(int4_file)
    ts.save(loaded, tmp_path / "again.slim")  # the loaded model carries its signature into the next file
    assert ts.read_manifest(tmp_path / "again.slim")["input"] == manifest["input"]
    report = ts.deploy(tmp_path / "again.slim", routes=["torch", "onnxruntime-fp32"], batch_sizes=[1],
                       min_run_time=0.02)
    assert report.route("onnxruntime-fp32").parity["samples"] == 1
    assert "lenet5 rebuilt from its factory" in report.baseline


def test_deploy_reports_one_line_per_phase_when_asked(int4_file, capsys):
    ts.deploy(int4_file, routes=["torch"], batch_sizes=[1], min_run_time=0.02)
    assert capsys.readouterr().err == ""  # the library is silent by default
    report = ts.deploy(int4_file, routes=["torch", "onnxruntime-fp32"], batch_sizes=[1], min_run_time=0.02,
                       progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("deploy lenet5-int4.slim: 2 of 2 routes valid (torch, onnxruntime-fp32); timing them")
    assert lines[1].startswith(f"deploy lenet5-int4.slim: chose {report.chosen}, ") and len(lines) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "gpu"}, "target = 'gpu' is invalid: expected one of 'cpu'"),
        ({"routes": ["tensorrt"]},
         "routes contains 'tensorrt': expected some of torch, torch-compact, torch-w8a8, torch-compile"),
        ({"batch_sizes": [0]}, r"batch_sizes = \[0\] is invalid: expected integers >= 1"),
        ({"max_accuracy_drop": -1}, r"max_accuracy_drop = -1 is invalid: expected points in \[0, 100\]"),
        ({"num_threads": 0}, "DeployConfig.num_threads = 0 is invalid: expected an integer >= 1"),
        ({"min_run_time": 0}, "DeployConfig.min_run_time = 0 is invalid: expected a number > 0"),
        ({"batch_size": 1}, "unknown option 'batch_size': expected DeployConfig fields .*batch_sizes"),
        ({"config": {"routes": ["torch"]}}, "config must be a DeployConfig, got dict"),
    ],
)
def test_bad_options_are_refused_before_any_work(int4_file, tmp_path, kwargs, message):
    with pytest.raises(ts.ConfigError, match=message):
        ts.deploy(int4_file, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_a_deploy_config_and_keyword_options_combine(int4_file):
    config = ts.DeployConfig(routes=["torch", "onnxruntime-fp32"], batch_sizes=[1], min_run_time=0.02)
    assert config.routes == ("torch", "onnxruntime-fp32") and ts.DeployConfig.from_dict(config.to_dict()) == config
    report = ts.deploy(int4_file, None, config, routes=["torch"])  # keywords apply on top of the config
    assert [r.name for r in report.routes] == ["torch"] and report.batch_sizes == [1]


def test_deploy_cli_writes_the_artifact(int4_file, tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli.main import app

    result = CliRunner().invoke(app, ["deploy", str(int4_file), "--out", str(tmp_path / "d"), "--batch", "1",
                                      "--routes", "torch,onnxruntime-fp32", "--min-run-time", "0.02", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chosen"] in ("torch", "onnxruntime-fp32") and (tmp_path / "d" / "deploy.md").exists()

"""bench(): every row beside its fp32 baseline, in both runtimes, with speedups computed from the medians."""

import copy
import json

import pytest
import torch

import torchslim as ts
from torchslim.benchmarking import BASELINE, bench
from torchslim.errors import ConfigError, DataError
from torchslim.export import ExportConfig, export

FAST = {"min_run_time": 0.01, "warmup": 1, "threads": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = ts.create_model("lenet5").eval()
    packed = copy.deepcopy(model)
    ts.quantize_(packed, ts.IntQuant(bits=4, granularity="group", group_size=32))
    ts.save(packed, directory / "q4.slim")
    calib = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    export(model, directory / "fp32.onnx", calib_data=calib)
    export(model, directory / "int8.onnx", ExportConfig(quant="int8-static", min_agreement=0.5, min_cosine=0.9),
           calib_data=calib)  # an untrained model on noise: parity is not what this file tests
    return directory


def test_slim_in_both_runtimes_beside_the_factory_baseline(files):
    report = bench(files / "q4.slim", input_shape=(1, 28, 28), batch_sizes=(1, 4), memory=True, **FAST)
    keys = [(r.name, r.runtime, r.batch) for r in report.rows]
    assert keys == [(n, rt, b) for n in (BASELINE, "q4.slim") for rt in ("torch", "onnxruntime") for b in (1, 4)]
    assert "torchslim.models:lenet5 rebuilt from its factory" in report.baseline["how"]
    base = {(r.runtime, r.batch): r for r in report.rows if r.baseline}
    for row in report.rows:
        assert row.baseline is (row.name == BASELINE)
        assert row.median_ms > 0 and row.p90_ms >= row.median_ms
        assert row.throughput_per_s == pytest.approx(row.batch / (row.median_ms / 1e3))
        assert row.speedup_vs_baseline == pytest.approx(base[row.runtime, row.batch].median_ms / row.median_ms)
        assert row.speedup_vs_torch_fp32 == pytest.approx(base["torch", row.batch].median_ms / row.median_ms)
        assert row.peak_memory_bytes is None or row.peak_memory_bytes > 0
    torch_peaks = [r.peak_memory_bytes for r in report.rows if r.runtime == "torch"]
    assert all(p and p > 0 for p in torch_peaks)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["input_shape"] == [1, 28, 28] and data["threads"] == 1


def test_quantized_onnx_needs_a_baseline(files):
    with pytest.raises(ConfigError, match="baseline is missing for int8.onnx"):
        bench(files / "int8.onnx", **FAST)
    report = bench(files / "int8.onnx", baseline=files / "fp32.onnx", batch_sizes=(2,), memory=False, **FAST)
    assert [(r.name, r.runtime) for r in report.rows] == [(BASELINE, "onnxruntime"), ("int8.onnx", "onnxruntime")]
    assert report.input_shape == [1, 28, 28]  # read from the graph
    assert report.skipped == {
        f"{BASELINE}/torch": "an ONNX graph runs in onnxruntime only",
        "int8.onnx/torch": "an ONNX graph runs in onnxruntime only",
    }
    assert report.rows[1].speedup_vs_torch_fp32 is None


def test_fp32_onnx_is_its_own_baseline(files):
    report = bench(files / "fp32.onnx", runtimes=("onnxruntime",), batch_sizes=(1,), memory=False, **FAST)
    assert "fp32.onnx itself" in report.baseline["how"]
    assert report.rows[0].speedup_vs_baseline == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"runtimes": ("tensorrt",)}, ConfigError, "runtimes = \\('tensorrt',\\) is invalid"),
        ({"batch_sizes": (0,)}, ConfigError, "batch_sizes = \\(0,\\) is invalid"),
        ({"threads": 0}, ConfigError, "threads = 0 is invalid"),
        ({"input_shape": (1, -28)}, DataError, "input_shape = \\(1, -28\\) is invalid"),
    ],
)
def test_bad_options_are_refused_before_timing(files, kwargs, error, match):
    with pytest.raises(error, match=match):
        bench(files / "q4.slim", **{"input_shape": (1, 28, 28), **kwargs})


def test_slim_without_input_shape_is_refused(files):
    with pytest.raises(DataError, match="input_shape is missing"):
        bench(files / "q4.slim")

"""Fast paths of packed layers on CPU: each equals the reference dequantized computation, is chosen and recorded
per layer, falls back with a reason, and never changes the saved file."""

import copy
import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import MissingDependencyError
from torchslim.kernels import cpu_gemv, native
from torchslim.quantize.runtime import rebind_, runtime_report, set_runtime_

CONFIGS = [
    ts.IntQuant(bits=4, granularity="group", group_size=128),  # 576 inputs: the last group is padded
    ts.IntQuant(bits=4, granularity="group", group_size=32, symmetric=True),
    ts.IntQuant(bits=8, granularity="channel"),
    ts.IntQuant(bits=8, granularity="group", group_size=64),
    ts.IntQuant(bits=3, granularity="group", group_size=16),
    ts.IntQuant(bits=2, granularity="tensor"),
    ts.IntQuant(bits=6, granularity="channel", symmetric=True),
]


def _quantized(config, in_features=576, out_features=200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(), nn.Linear(out_features, 37))
    ts.quantize_(model, config)
    return model.eval()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.bits}b-{c.granularity}-{c.group_size}-{c.symmetric}")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "native"])
@pytest.mark.parametrize(("in_features", "rows"), [(576, 1), (203, 3), (576, 9)],
                         ids=["576x1", "odd-203x3", "576x9"])
def test_integer_gemv_equals_the_dequantized_linear(config, compiled, in_features, rows):
    model = _quantized(config, in_features=in_features)
    layer = model[0]
    pack = cpu_gemv.prepack(layer)
    # <= 4 bits: four codes per 16-bit lane; groups of 16: one byte a code; else two codes per lane
    layout = ("bytes" if config.group_size == 16 else
              "nibble-lanes" if config.bits <= 4 and config.group_size != 32 else "byte-lanes")
    assert pack.layout == layout and pack.codes.dtype == torch.uint8 and pack.codes.shape[0] == 200
    assert pack.codes.shape[1] >= in_features * (0.5 if layout == "nibble-lanes" else 1)
    torch.testing.assert_close(cpu_gemv.reference_weight(pack), layer.dequantize_weight(), atol=1e-6, rtol=1e-6)
    x = torch.randn(rows, in_features)
    reference = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    with torch.inference_mode():
        got = cpu_gemv.gemv(x, pack, layer.bias, compiled=compiled)
    torch.testing.assert_close(got, reference, atol=1e-4 * float(reference.detach().abs().max()), rtol=1e-4)
    if config.granularity == "group" and in_features == 576:  # one byte a code; 4 x 128 + a last group of 64
        groups = -(-576 // config.group_size)
        assert pack.scale.shape == (200, groups) and pack.group_len == config.group_size


@pytest.mark.parametrize(("config", "in_features"), [(ts.IntQuant(bits=8, granularity="channel"), 1100),
                                                     (ts.IntQuant(bits=4, granularity="channel"), 16500)],
                         ids=["byte-lanes-1100", "nibble-lanes-16500"])
def test_one_row_sums_longer_than_a_chunk_equal_the_dequantized_linear(config, in_features):
    # one group a row longer than what the kernel sums in 32 bits at a time (32 byte blocks, 256 nibble blocks):
    # the one-row loop and the tile loop (3 rows) both scale partial sums
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 24))
    ts.quantize_(model, config)
    layer = model[0]
    pack = cpu_gemv.prepack(layer)
    assert pack.layout == ("byte-lanes" if config.bits == 8 else "nibble-lanes") and pack.scale.shape[1] == 1
    x = torch.randn(3, in_features) * 4.0
    reference = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    with torch.inference_mode():
        one = torch.cat([cpu_gemv.gemv(row[None], pack, layer.bias) for row in x])
        tile = cpu_gemv.gemv(x, pack, layer.bias)
    tolerance = 1e-4 * float(reference.abs().max())
    torch.testing.assert_close(one, reference, atol=tolerance, rtol=1e-4)
    torch.testing.assert_close(tile, reference, atol=tolerance, rtol=1e-4)


def test_the_plain_c_loops_without_avx2_equal_the_dequantized_linear(tmp_path, monkeypatch):
    # CPUs without AVX2 (ARM, old x86) get the kernel's plain loops: built here by hiding AVX2 from the flags
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(native, "_LIBRARY", None)
    for config in CONFIGS:
        for in_features, rows in ((576, 1), (203, 3)):
            layer = _quantized(config, in_features=in_features)[0]
            x = torch.randn(rows, in_features)
            reference = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
            got = cpu_gemv.gemv(x, cpu_gemv.prepack(layer), layer.bias)
            torch.testing.assert_close(got, reference, atol=1e-4 * float(reference.abs().max()), rtol=1e-4)
    assert "-mavx2" not in native._flags() and len(list((tmp_path / "native").glob("gemv-*.so"))) == 1


@pytest.mark.parametrize("runtime", ["auto", "compact", "dense"])
@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"{c.bits}b-{c.granularity}")
@pytest.mark.parametrize("batch", [1, 5])
def test_every_runtime_matches_the_reference_path(runtime, config, batch):
    model = _quantized(config)
    x = torch.randn(batch, 576)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        reference = model(x)
    set_runtime_(model, runtime)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, reference, atol=2e-4, rtol=1e-4)
    report = {row["name"]: row for row in runtime_report(model)}
    bucket = "1 row" if batch == 1 else "rows"
    assert set(report) == {"0", "2"}
    for row in report.values():
        path = row["paths"][bucket]
        assert row["reasons"][bucket]
        if runtime == "dense":
            assert path == "dense"
        if runtime == "compact":  # the GEMV takes a few rows too: no fp32 copy
            assert path == "gemv"
            assert row["derived_bytes"] < row["stored_bytes"] * 2 + 4 * 576 * 200 // 4
        if runtime == "auto":
            assert path in {"gemv", "dense"}


@pytest.mark.parametrize("runtime", ["auto", "compact"])
def test_inputs_longer_than_the_gemv_takes_run_dense_or_reference(runtime, monkeypatch):
    from torchslim.quantize import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "MIN_MODEL_WEIGHTS", 0)  # a small model: time its layers all the same
    monkeypatch.setattr(runtime_module, "MIN_GEMV_WEIGHTS", 0)
    monkeypatch.setattr(runtime_module, "_measure", lambda layer, model_bytes, rows=1: {"gemv_ms": 1.0,
                                                                                       "dense_ms": 2.0})
    model = _quantized(ts.IntQuant(bits=4, granularity="group", group_size=64))
    short, long = torch.randn(5, 576), torch.randn(runtime_module.GEMV_MAX_ROWS + 1, 576)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        want_short, want_long = model(short), model(long)
    set_runtime_(model, runtime)
    with torch.inference_mode():
        got_short = model(short)
        before = runtime_report(model)[0]["derived_bytes"]
        got_long = model(long)
    torch.testing.assert_close(got_short, want_short, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_long, want_long, atol=2e-4, rtol=1e-4)
    row = runtime_report(model)[0]
    assert row["paths"]["rows"] == "gemv" and f"more than {runtime_module.GEMV_MAX_ROWS} rows" in row["reasons"]["rows"]
    assert before < 200 * 576  # the GEMV's codes only, half a byte a weight
    fp32_copy = 200 * 576 * 4
    assert (row["derived_bytes"] >= fp32_copy) == (runtime == "auto")  # compact never keeps an fp32 copy
    with torch.inference_mode():  # a float16 input of many rows takes the same fallback, in float16
        half = model[0](long.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), model[0](long), atol=5e-2, rtol=1e-2)


def test_auto_picks_by_measurement_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path))
    from torchslim.quantize import runtime as rt

    monkeypatch.setattr(rt, "_MEASURED", {})
    model = _quantized(ts.IntQuant(bits=8, granularity="channel"), in_features=1024, out_features=1024)
    set_runtime_(model)
    with torch.inference_mode():
        model(torch.randn(1, 1024))
    cache = json.loads((tmp_path / "cpu-paths.json").read_text())
    assert len(cache) == 1  # the 1024 x 1024 layer; the 1024 x 37 one is too small to be worth a GEMV
    (timing,) = cache.values()
    report = {row["name"]: row for row in runtime_report(model)}
    expected = "gemv" if timing["dense_ms"] / timing["gemv_ms"] > 1.0 else "dense"
    assert report["0"]["paths"]["1 row"] == expected and "ms vs dense" in report["0"]["reasons"]["1 row"]
    assert report["2"]["paths"]["1 row"] == "dense" and "below 524,288 and" in report["2"]["reasons"]["1 row"]
    # a second model of the same shapes reuses the measurement: no benchmark runs
    monkeypatch.setattr(rt, "_MEASURED", {})
    monkeypatch.setattr(rt, "_time_paths", lambda *a, **k: pytest.fail("measured again"))
    again = _quantized(ts.IntQuant(bits=8, granularity="channel"), in_features=1024, out_features=1024)
    set_runtime_(again)
    with torch.inference_mode():
        again(torch.randn(1, 1024))
    assert runtime_report(again)[0]["paths"] == report["0"]["paths"]


def test_a_layer_the_gemv_cannot_take_falls_back_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    ts.quantize_(model, ts.CodebookQuant(bits=4), filter_fn=lambda m, n: n == "2")
    ts.quantize_(model, ts.IntQuant(bits=4), filter_fn=lambda m, n: n == "0")
    x = torch.randn(1, 1, 28, 28)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        reference = model(x)
    set_runtime_(model, "compact")
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, reference)
    report = {row["name"]: row for row in runtime_report(model)}
    assert report["0"]["paths"]["rows"] == "reference" and "Linear layers only" in report["0"]["reasons"]["rows"]
    assert report["2"]["paths"]["1 row"] == "reference" and "integer codes" in report["2"]["reasons"]["1 row"]
    assert report["0"]["derived_bytes"] == 0 and report["2"]["derived_bytes"] == 0


def test_load_sets_the_runtime_and_the_file_stays_byte_identical(tmp_path):
    torch.manual_seed(0)
    base = ts.create_model("lenet300").eval()
    ts.quantize_(base, ts.IntQuant(bits=4, granularity="group", group_size=32))
    ts.save(base, tmp_path / "a.slim")
    loaded = ts.load(tmp_path / "a.slim")
    assert {row["policy"] for row in runtime_report(loaded)} == {"auto"}
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        fast = loaded(x)
        loaded(x[:1])
    reference = ts.load(tmp_path / "a.slim", runtime="reference")
    with torch.inference_mode():
        torch.testing.assert_close(fast, reference(x))
    assert all(not row["paths"] for row in runtime_report(reference))
    ts.save(loaded, tmp_path / "b.slim")  # derived state is never saved
    assert (tmp_path / "a.slim").read_bytes() == (tmp_path / "b.slim").read_bytes()
    with pytest.raises(ts.ConfigError, match="runtime = 'fast' is invalid: expected one of 'auto'"):
        ts.load(tmp_path / "a.slim", runtime="fast")


def test_training_and_changed_weights_take_the_reference_path():
    model = _quantized(ts.IntQuant(bits=4, granularity="channel"))
    set_runtime_(model, "dense")
    x = torch.randn(2, 576)
    with torch.inference_mode():
        before = model(x)
    state = model.state_dict()
    state["0.scale"] = state["0.scale"] * 2
    model.load_state_dict(state)  # new stored values: the fp32 copy must be rebuilt
    with torch.inference_mode():
        after = model(x)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        torch.testing.assert_close(after, model(x))
    assert not torch.equal(before, after)
    set_runtime_(model, "dense")
    model.train()
    model(x)
    assert all(not row["paths"] for row in runtime_report(model))
    with torch.no_grad():
        model[0].bias.add_(1.0)  # trained (here: by hand), then back to eval: derived state is rebuilt
    model.eval()
    with torch.inference_mode():
        trained = model(x)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        torch.testing.assert_close(trained, model(x))
    codebook = copy.deepcopy(_quantized(ts.CodebookQuant(bits=3)))
    set_runtime_(codebook, "dense")
    out = codebook(x)  # grad enabled and the codebook is a parameter: differentiable reference path
    out.sum().backward()
    assert codebook[0].codebook.grad is not None


@pytest.mark.parametrize("runtime", ["auto", "compact", "dense"])
def test_half_precision_and_codebook_layers_match_the_reference(runtime):
    for config in (ts.HalfPrecision(dtype="fp16"), ts.HalfPrecision(dtype="bf16"), ts.CodebookQuant(bits=4)):
        model = _quantized(config)
        x = torch.randn(3, 576)
        set_runtime_(model, "reference")
        with torch.inference_mode():
            reference = model(x)
        set_runtime_(model, runtime)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)


def _sparse_int4_row(zeros: float) -> dict:
    """A pruned 800 -> 500 int4 layer run at 32 rows under ``auto``: checked against the reference path; its
    runtime_report row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(800, 500)).eval()
    ts.prune_(model, ts.MagnitudePruning(scope="global", amount=zeros))
    ts.finalize_(model)
    ts.quantize_(model, ts.IntQuant(bits=4))
    x = torch.randn(32, 800)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        reference = model(x)
    set_runtime_(model, "auto")
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    (row,) = runtime_report(model)
    return row


@pytest.mark.parametrize("zeros", [0.5, 0.97])
def test_a_sparse_layer_takes_csr_only_when_measured_faster(zeros):
    row = _sparse_int4_row(zeros)
    if zeros < 0.8:  # never measured: CSR lost to dense below 80% zeros in every shape measured
        assert row["paths"]["rows"] == "dense" and "zeros" not in row["reasons"]["rows"]
    elif row["paths"]["rows"] == "sparse":
        assert "97.0% zeros: CSR" in row["reasons"]["rows"] and row["derived_bytes"] < 4 * 800 * 500 * 0.1
    else:
        assert row["paths"]["rows"] == "dense"


def test_copies_of_a_running_model_rebuild_their_own_derived_state(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(800, 500)).eval()
    ts.prune_(model, ts.MagnitudePruning(scope="global", amount=0.97))
    ts.finalize_(model)
    ts.quantize_(model, ts.IntQuant(bits=4))
    set_runtime_(model, "compact")
    x = torch.randn(32, 800)
    with torch.inference_mode():
        before = model(x)
    twin = copy.deepcopy(model)  # derived tensors (maybe CSR) are not copied
    state = twin.state_dict()
    state["0.scale"] = state["0.scale"] * 2
    twin.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)  # the original is untouched by the copy's change
        doubled = twin(x)
    torch.save(twin, tmp_path / "whole.pt")  # pickling a running model works (derived state dropped)
    set_runtime_(twin, "reference")
    with torch.inference_mode():
        torch.testing.assert_close(doubled, twin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("runtime", "fallback"), [("auto", "dense"), ("compact", "reference")])
def test_a_kernel_that_does_not_compile_falls_back_and_says_so(monkeypatch, runtime, fallback):
    from torchslim.quantize import runtime as rt

    def no_compiler():
        raise MissingDependencyError("the native GEMV needs a C compiler (cc or gcc; $CC): none was found")

    monkeypatch.setattr(rt, "_MEASURED", {})
    monkeypatch.setattr(rt, "_read_cache", lambda: {})
    monkeypatch.setattr(native, "gemv_library", no_compiler)
    model = _quantized(ts.IntQuant(bits=8, granularity="channel"), in_features=1024, out_features=1024)
    set_runtime_(model, runtime)
    x = torch.randn(1, 1024)
    with torch.inference_mode():
        got = model(x)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        torch.testing.assert_close(got, model(x))
    set_runtime_(model, runtime)
    with torch.inference_mode():
        model(x)
    row = runtime_report(model)[0]
    assert row["paths"]["1 row"] == fallback
    assert "the native GEMV failed here (the native GEMV needs a C compiler" in row["reasons"]["1 row"]


def test_a_sparse_layer_measured_faster_as_csr_runs_csr(monkeypatch):
    from torchslim.quantize import runtime as rt

    class _SparseWins(dict):
        def get(self, key, default=None):  # every CSR measurement: sparse 10x faster than dense
            return {"dense_ms": 1.0, "sparse_ms": 0.1} if key.startswith("sparse-") else default

    monkeypatch.setattr(rt, "_MEASURED", {})
    monkeypatch.setattr(rt, "_read_cache", lambda: _SparseWins())
    row = _sparse_int4_row(0.97)
    assert row["paths"]["rows"] == "sparse" and "97.0% zeros: CSR 0.100 ms vs dense 1.000 ms" in row["reasons"]["rows"]
    assert 0 < row["derived_bytes"] < 4 * 800 * 500 * 0.1  # CSR of 3% nonzeros, no fp32 copy


# --- runtime="w8a8": int8 x int8 products for several rows ------------------------------------------------------
W8A8_CONFIGS = [ts.IntQuant(bits=8, granularity="channel", symmetric=True), ts.IntQuant(bits=8, granularity="channel"),
                ts.IntQuant(bits=4, granularity="channel"), ts.IntQuant(bits=8, granularity="tensor")]


@pytest.mark.parametrize("config", W8A8_CONFIGS, ids=lambda c: f"{c.bits}b-{c.granularity}-{c.symmetric}")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_int8_products_equal_the_weight_only_layer_up_to_activation_rounding(config, compiled):
    from torchslim.kernels import cpu_int8mm

    layer = _quantized(config, in_features=577, out_features=45)[0]
    x = torch.randn(7, 577)
    reference = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    got = cpu_int8mm.linear(x, cpu_int8mm.prepack(layer), layer.bias, compiled_kernel=compiled)
    # per-row int8 activations: each product is off by at most half a step of the row's scale per input
    bound = (x.abs().amax(-1, keepdim=True) / 127 / 2) * layer.dequantize_weight().abs().sum(-1)
    assert bool(((got - reference).abs() <= bound + 1e-4).all())
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.9999


def _w8a8_row_that_ran_fp32() -> dict:
    """An int8 channel layer under w8a8 on 4 rows: asserts its outputs equal the reference (nothing rounded) and
    returns its runtime_report row (read after a fresh w8a8 pass, so the reasons are the chosen path's)."""
    model = _quantized(ts.IntQuant(bits=8, granularity="channel"))
    set_runtime_(model, "w8a8")
    x = torch.randn(4, 576)
    with torch.inference_mode():
        got = model(x)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        torch.testing.assert_close(got, model(x))  # not rounded: the fp32 path ran
    set_runtime_(model, "w8a8")
    with torch.inference_mode():
        model(x)
    return runtime_report(model)[0]


def test_w8a8_keeps_layers_dense_where_the_int8_product_measured_slower(int8mm_timed):
    # torch._int_mm ran 37x slower than F.linear on an AVX2 CPU without VNNI: w8a8 must not pick it there
    int8mm_timed(dense_ms=1.0, int8mm_ms=37.0)
    row = _w8a8_row_that_ran_fp32()
    assert row["paths"]["rows"] == "dense"
    reason = "int8 x int8 37.000 ms vs dense 1.000 ms at 256 rows (0.03x); the fp32 layer is faster"
    assert reason in row["reasons"]["rows"]
    assert row["derived_bytes"] == 200 * 576 * 4  # the fp32 copy only: the int8 codes were dropped


def test_w8a8_measures_whichever_path_is_faster_here():
    model = _quantized(ts.IntQuant(bits=8, granularity="channel"))
    set_runtime_(model, "w8a8")
    with torch.inference_mode():
        model(torch.randn(4, 576))
    row = runtime_report(model)[0]
    assert row["paths"]["rows"] in ("int8mm", "dense") and "ms vs dense" in row["reasons"]["rows"]


def test_w8a8_runs_several_rows_as_int8_products_and_one_row_as_auto(tmp_path, int8mm_timed):
    int8mm_timed(dense_ms=2.0, int8mm_ms=1.0)
    torch.manual_seed(0)
    model = ts.create_model("lenet300").eval()
    ts.quantize_(model, ts.IntQuant(bits=8, granularity="channel"))
    path = tmp_path / "m.slim"
    ts.save(model, path)
    loaded = ts.load(path, runtime="w8a8")
    x = torch.rand(16, 1, 28, 28)
    set_runtime_(model, "reference")
    with torch.inference_mode():
        reference, got = model(x), loaded(x)
        loaded(x[:1])
    assert not torch.equal(got, reference)  # the activations really were rounded
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.9999
    rows = runtime_report(loaded)
    assert [r["paths"]["rows"] for r in rows] == ["int8mm"] * 3
    assert rows[0]["paths"]["1 row"] == runtime_report(ts.load(path))[0]["paths"].get("1 row", "dense")
    assert rows[0]["derived_bytes"] >= 784 * 300  # the int8 codes (plus what the one-row path holds)
    x.requires_grad_(True)  # no autograd through the int8 kernel: a call that needs gradients takes dense
    torch.testing.assert_close(loaded(x), reference)


def test_w8a8_leaves_grouped_layers_dense_and_says_why():
    model = _quantized(ts.IntQuant(bits=4, granularity="group", group_size=64))
    set_runtime_(model, "w8a8")
    with torch.inference_mode():
        model(torch.randn(4, 576))
    row = runtime_report(model)[0]
    assert row["paths"]["rows"] == "dense" and "group scales" in row["reasons"]["rows"]


def test_w8a8_without_a_compiler_falls_back_to_dense(monkeypatch):
    from torchslim.kernels import cpu_int8mm

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_int8mm, "compiled", no_compiler)
    row = _w8a8_row_that_ran_fp32()
    assert row["paths"]["rows"] == "dense"
    assert "int8 product failed here (no C++ compiler found)" in row["reasons"]["rows"]


@pytest.mark.parametrize("config", [ts.IntQuant(bits=8, granularity="channel"), CONFIGS[0]], ids=["channel", "group"])
def test_compiled_kernels_take_non_contiguous_inputs(config):
    # the compiled kernels skip stride checks: the bound functions must hand them contiguous rows
    from torchslim.kernels import cpu_int8mm

    layer = _quantized(config)[0]
    x = torch.randn(576, 3).t()  # rows 576 apart in memory, not contiguous
    reference = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    run = cpu_gemv.bind(cpu_gemv.prepack(layer), layer.bias)
    for row in range(3):
        torch.testing.assert_close(run(x[row:row + 1]), reference[row:row + 1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(run(x), reference, atol=1e-3, rtol=1e-4)
    if config.granularity == "channel":
        got = cpu_int8mm.linear(x, cpu_int8mm.prepack(layer), layer.bias)
        assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.9999


class _Attention(nn.Module):
    """q/k/v projections called on one input (as in Llama), or on three inputs (``shared=False``)."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
        self.o_proj = nn.Linear(128, 64)
        self.shared = shared

    def forward(self, x):
        q = self.q_proj(x)
        k = self.k_proj(x if self.shared else x * 2)
        v = self.v_proj(x)
        return self.o_proj(torch.cat([q, k, v], -1))


@pytest.mark.parametrize("shared", [True, False], ids=["one-input", "other-inputs"])
def test_siblings_on_one_input_run_as_one_gemv_with_the_same_outputs(shared):
    torch.manual_seed(0)
    model = nn.Sequential(_Attention(shared), _Attention(shared)).eval()
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32))
    rows = [torch.randn(1, 64) for _ in range(3)] + [torch.randn(3, 64)]
    set_runtime_(model, "reference")
    with torch.inference_mode():
        reference = [model(x) for x in rows]
    set_runtime_(model, "compact")  # every Linear takes the GEMV at one row
    with torch.inference_mode():
        got = [model(x) for x in rows]
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    report = {row["name"]: row for row in runtime_report(model)}
    reason = report["0.k_proj"]["reasons"]["1 row"]
    assert "stacked with q_proj, v_proj" in reason
    assert ("runs alone" in reason) is not shared
    assert "stacked" not in report["0.o_proj"]["reasons"]["1 row"]
    stacked = report["0.q_proj"]["derived_bytes"]
    assert (stacked >= 128 * 64) is shared  # the stacked codes, one byte a weight, counted on the first member


def test_a_changed_sibling_rebuilds_the_stacked_codes():
    torch.manual_seed(0)
    model = _Attention().eval()
    ts.quantize_(model, ts.IntQuant(bits=8, granularity="channel"))
    set_runtime_(model, "compact")
    x = torch.randn(1, 64)
    with torch.inference_mode():
        model(x)
    model.k_proj.bias = None
    model.v_proj.bias.data.add_(1.0)
    rebind_(model.v_proj)
    expected = model.o_proj(torch.cat([model.q_proj.run(x, model.q_proj.dequantize_weight()),
                                       model.k_proj.run(x, model.k_proj.dequantize_weight()),
                                       model.v_proj.run(x, model.v_proj.dequantize_weight())], -1))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)

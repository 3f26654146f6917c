"""quantize_ as a user sees it: smaller files, same outputs after reload, clear reports and errors."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import CodebookQuant, HalfPrecision, IntQuant, IntQuantLayer, quantize_


@pytest.fixture(scope="module")
def lenet5_and_fp32_bytes(tmp_path_factory):
    torch.manual_seed(0)
    model = ts.create_model("lenet5")
    path = tmp_path_factory.mktemp("q") / "fp32.slim"
    ts.save(model, path)
    return model, os.path.getsize(path)


# (config, max file bytes as a fraction of the fp32 .slim) from the quantization issue's acceptance
SIZE_BOUNDS = [
    (IntQuant(bits=8, granularity="channel"), 0.27),
    (IntQuant(bits=4, granularity="channel"), 0.135),
    (IntQuant(bits=4, granularity="group", group_size=32), 0.17),
    (IntQuant(bits=2, granularity="channel"), 0.075),
    (HalfPrecision(dtype="fp16"), 0.51),
    (HalfPrecision(dtype="bf16"), 0.51),
    (CodebookQuant(bits=4), 0.135),
]


@pytest.mark.parametrize(("config", "bound"), SIZE_BOUNDS, ids=[str(c) for c, _ in SIZE_BOUNDS])
def test_saved_file_is_physically_smaller_and_reloads_identically(lenet5_and_fp32_bytes, tmp_path, config, bound):
    model, fp32_bytes = lenet5_and_fp32_bytes
    quantized = copy.deepcopy(model)
    report = quantize_(quantized, config)
    assert sorted(report.quantized) == ["0", "2", "5", "7"]
    path = tmp_path / "q.slim"
    ts.save(quantized, path)
    assert os.path.getsize(path) <= bound * fp32_bytes
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ts.load(path)(x), quantized.eval()(x))


def test_fresh_process_reload_gives_identical_outputs(lenet5_and_fp32_bytes, tmp_path):
    model, _ = lenet5_and_fp32_bytes
    quantized = copy.deepcopy(model)
    quantize_(quantized, IntQuant(bits=3, granularity="group", group_size=32))
    path = tmp_path / "q3.slim"
    ts.save(quantized, path)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    expected = quantized.eval()(x)
    from safetensors.torch import save_file

    save_file({"x": x, "y": expected}, str(tmp_path / "io.safetensors"))
    code = (
        "import sys, torch, torchslim as ts; from safetensors.torch import load_file;"
        f"d = load_file({str(tmp_path / 'io.safetensors')!r}); m = ts.load({str(path)!r});"
        "sys.exit(0 if torch.equal(m(d['x']), d['y']) else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_output_error_shrinks_with_more_bits(lenet5_and_fp32_bytes, bits):
    model, _ = lenet5_and_fp32_bytes
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    reference = model.eval()(x)
    quantized = copy.deepcopy(model)
    quantize_(quantized, IntQuant(bits=bits))
    error = (quantized(x) - reference).abs().max().item()
    scale = reference.abs().max().item()
    # each extra bit halves the step: error ~ 2**-bits (loose bound with margin)
    assert error < scale * 4 * 2.0**-bits


def test_layer_dequantizes_to_the_affine_formula():
    layer = nn.Linear(64, 8)
    q = IntQuantLayer.from_float(layer, bits=4, granularity="group", group_size=16, symmetric=False)
    from torchslim.quantize.affine import compute_qparams, dequantize_affine, grouped_view, quantize_affine

    grouped = grouped_view(layer.weight.detach(), "group", 16)
    scale, zp = compute_qparams(grouped, 4, False, torch.float16)
    expected = dequantize_affine(quantize_affine(grouped, scale, zp, 4), scale, zp).reshape(8, 64)
    assert torch.equal(q.dequantize_weight(), expected)
    assert q.packed.numel() == 8 * 64 // 2  # two 4-bit codes per byte


def test_padding_handles_group_sizes_that_do_not_divide():
    conv = nn.Conv2d(3, 4, 3)  # fan_in 27
    q = IntQuantLayer.from_float(conv, bits=4, granularity="group", group_size=16, symmetric=False)
    assert q.weight.shape == conv.weight.shape
    assert (q.weight - conv.weight).abs().max() < 0.1
    model = nn.Sequential(nn.Linear(27, 4))
    with pytest.raises(ConfigError, match=r"group_size = 16 is invalid for layer '0' with input dimension 27"):
        quantize_(model, IntQuant(granularity="group", group_size=16, pad=False))
    assert isinstance(model[0], nn.Linear)  # nothing changed


def test_zeros_survive_quantization_so_pruned_weights_stay_sparse():
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.masked_fill_(layer.weight.abs() < 0.1, 0.0)
    for q in (
        IntQuantLayer.from_float(layer, 4, "channel", None, False),
        IntQuantLayer.from_float(layer, 4, "channel", None, True),
    ):
        assert bool((q.weight[layer.weight == 0] == 0).all())
    from torchslim.quantize import CodebookLayer

    cb = CodebookLayer.from_float(layer, 3)
    assert bool(((layer.weight == 0) == (cb.weight == 0)).all())


def test_mixed_precision_overrides_and_skips_are_reported():
    model = ts.create_model("resnet", widths=[8, 16], blocks=[1, 1])
    report = quantize_(model, IntQuant(bits=4), overrides={"stem.0": IntQuant(bits=8), "fc": None})
    assert report.quantized["stem.0"]["bits"] == 8
    assert report.quantized["stages.1.0.conv1"]["bits"] == 4
    assert report.skipped["fc"] == "override is None"
    assert "BatchNorm2d is not supported" in report.skipped["stem.1"]
    assert isinstance(model.fc, nn.Linear)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert "skipped" in str(report)


def test_filter_fn_and_bad_overrides():
    model = ts.create_model("lenet300")
    report = quantize_(model, IntQuant(bits=8), filter_fn=lambda m, name: m.out_features > 10)
    assert sorted(report.quantized) == ["1", "3"] and report.skipped["5"] == "filter_fn returned False"
    with pytest.raises(ConfigError, match="overrides names layer 'fc9'"):
        quantize_(ts.create_model("lenet300"), IntQuant(), overrides={"fc9": None})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "IntQuant.bits = 9 is invalid: expected an integer in [2, 8]"),
        ({"bits": 1}, "IntQuant.bits = 1"),
        ({"granularity": "row"}, "IntQuant.granularity = 'row'"),
        ({"group_size": 0}, "IntQuant.group_size = 0"),
        ({"rounding": "ceil"}, "IntQuant.rounding = 'ceil'"),
    ],
)
def test_config_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as info:
        IntQuant(**kwargs)
    assert message in str(info.value)


def test_half_precision_keeps_16_bit_storage_and_runs_on_float_inputs():
    model = ts.create_model("lenet300")
    quantize_(model, HalfPrecision(dtype="bf16"))
    assert model[1].weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 1, 28, 28)).dtype == torch.float32


def test_codebook_centroids_are_fine_tunable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    model.__dict__["_torchslim_factory"] = None
    quantize_(model, CodebookQuant(bits=2))
    layer = model[0]
    before = layer.codebook.detach().clone()
    loss = model(torch.randn(5, 8)).pow(2).sum()
    loss.backward()
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
    with torch.no_grad():
        layer.codebook -= 0.1 * layer.codebook.grad
    assert not torch.equal(layer.codebook, before)
    assert len(torch.unique(layer.weight)) <= 4


def test_nothing_to_quantize_is_an_error_not_an_empty_report():
    from torchslim.errors import ModelError

    expected = r"quantize_ found no layer to quantize in Sequential: looked for Linear.* layers; skipped nothing"
    with pytest.raises(ModelError, match=expected):
        ts.quantize_(nn.Sequential(nn.ReLU()), ts.IntQuant())
    model = nn.Sequential(nn.Linear(4, 4))
    ts.quantize_(model, ts.IntQuant())
    with pytest.raises(ModelError, match=r"skipped \{'0': 'already a IntQuantLayer"):
        ts.quantize_(model, ts.IntQuant())  # already quantized: says so

"""GPTQ: better than round-to-nearest at the same bits, in IntQuantLayer's exact packed format."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.quantize.gptq import GPTQ, gptq_, gptq_quantize, layer_hessian
from torchslim.quantize.layers import IntQuantLayer


def _correlated_inputs(n: int = 2048, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with a low-rank structure, like real activations (GPTQ exploits their correlations)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
    return base + 0.1 * torch.randn(n, cols, generator=gen)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_layerwise_reconstruction_beats_round_to_nearest(bits, act_order):
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    x = _correlated_inputs()
    dequantized, _, _ = gptq_quantize(layer.weight, layer_hessian(layer, x), GPTQ(bits=bits, group_size=32,
                                                                                   act_order=act_order))
    rtn = IntQuantLayer.from_float(layer, bits, "group", 32, False).dequantize_weight()
    reference = x @ layer.weight.detach().T
    gptq_error = float(((x @ dequantized.T - reference) ** 2).mean())
    rtn_error = float(((x @ rtn.T - reference) ** 2).mean())
    assert gptq_error < 0.3 * rtn_error  # measured ratios 0.04-0.11


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_lowers_the_output_error_when_weights_have_outliers(act_order):
    torch.manual_seed(0)
    layer = nn.Linear(128, 256)
    with torch.no_grad():  # a few large weights stretch their groups' min/max ranges
        layer.weight += (torch.rand_like(layer.weight) < 0.01) * torch.randn_like(layer.weight) * 0.5
    # independent input channels of unequal scale (with low-rank correlated inputs GPTQ's own error compensation
    # already recovers most of what clipping would, and the search can lose a little)
    x = torch.randn(1024, 128, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3.0, 128)
    reference = x @ layer.weight.detach().T
    errors = {}
    for clip in (False, True):
        config = GPTQ(bits=4, group_size=32, act_order=act_order, clip_search=clip)
        dequantized, scale, _ = gptq_quantize(layer.weight, layer_hessian(layer, x), config)
        errors[clip] = float(((x @ dequantized.T - reference) ** 2).mean())
        if clip:  # some ranges were shrunk: their scales are below the plain min/max ones
            plain = gptq_quantize(layer.weight, layer_hessian(layer, x), config.replace(clip_search=False))[1]
            assert bool((scale < plain).any())
    assert errors[True] < 0.97 * errors[False]


def test_clipped_params_never_raise_the_weighted_rounding_error():
    from torchslim.quantize.affine import compute_qparams, dequantize_affine, quantize_affine
    from torchslim.quantize.gptq import _clipped_qparams

    torch.manual_seed(2)
    columns = torch.randn(64, 32) * torch.rand(64, 1) + (torch.rand(64, 32) < 0.05) * 4.0
    importance = torch.rand(32) + 0.1
    grouped = columns.unsqueeze(1)

    def error(s, z):
        restored = dequantize_affine(quantize_affine(grouped, s, z, 3), s, z)
        return ((restored - grouped) ** 2 * importance).sum(dim=(1, 2))

    for symmetric in (False, True):
        config = GPTQ(bits=3, group_size=32, symmetric=symmetric, clip_search=True)
        clipped = error(*_clipped_qparams(columns, importance, config))
        plain = error(*compute_qparams(grouped, 3, symmetric, torch.float16))
        assert bool((clipped <= plain + 1e-6).all()) and bool((clipped < plain).any())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, None, 48])
def test_codes_are_exactly_intquantlayer_format(act_order, group_size):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(100, 40))  # 100 % 32 != 0 and 100 % 48 != 0: a partial last group
    x = _correlated_inputs(512, 100)
    config = GPTQ(bits=4, group_size=group_size, act_order=act_order, blocksize=16, clip_search=not act_order)
    expected, scale, zero_point = gptq_quantize(model[0].weight, layer_hessian(model[0], x), config)
    report = gptq_(model, config, x)
    layer = model[0]
    assert isinstance(layer, IntQuantLayer) and report.quantized["0"]["method"] == "gptq"
    assert layer.granularity == ("channel" if group_size is None else "group")
    assert torch.equal(layer.dequantize_weight(), expected)
    assert torch.equal(layer.scale, scale) and torch.equal(layer.zero_points(), zero_point)
    assert int(layer.codes().max()) <= 15


def test_gptq_model_saves_loads_and_is_4_bits(tmp_path):
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    x = torch.rand(256, 1, 28, 28)
    gptq_(model, GPTQ(bits=4, group_size=64), x)
    path = ts.save(model, tmp_path / "gptq.slim")
    loaded = ts.load(path)
    assert torch.equal(loaded(x[:8]), model(x[:8]))
    weights = sum(m.numel for m in loaded.modules() if isinstance(m, IntQuantLayer))
    assert path.stat().st_size * 8 / weights < 5.0  # codes + fp16 scales/zero points per 64 + biases


def test_conv_models_grouped_and_1d_beat_round_to_nearest():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.ReLU(),
        nn.Flatten(2), nn.Conv1d(16, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 96, 10),
    )
    x = torch.randn(64, 3, 16, 16)
    gptq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    report = gptq_(gptq_model, GPTQ(bits=3, group_size=16), x)
    ts.quantize_(rtn_model, ts.IntQuant(bits=3, granularity="group", group_size=16))
    assert {name: row["method"] for name, row in report.quantized.items()} == dict.fromkeys(
        ["0", "2", "5", "8"], "gptq"
    )
    with torch.no_grad():
        y = model(x)
        assert ((gptq_model(x) - y) ** 2).mean() < 0.75 * ((rtn_model(x) - y) ** 2).mean()  # measured 0.52


def test_small_model_fidelity_better_than_round_to_nearest(trained_lenet5, digits):
    from torchslim.measure.accuracy import fidelity

    calib = digits.train.tensors[0][:256]
    test_x = digits.test.tensors[0]
    gptq_model, rtn_model = copy.deepcopy(trained_lenet5), copy.deepcopy(trained_lenet5)
    gptq_(gptq_model, GPTQ(bits=3, group_size=32, act_order=True), calib)
    ts.quantize_(rtn_model, ts.IntQuant(bits=3, granularity="group", group_size=32))
    gptq_fid = fidelity(gptq_model, trained_lenet5, test_x)
    rtn_fid = fidelity(rtn_model, trained_lenet5, test_x)
    with torch.no_grad():
        y = trained_lenet5(test_x)
        gptq_mse = float(((gptq_model(test_x) - y) ** 2).mean())
        rtn_mse = float(((rtn_model(test_x) - y) ** 2).mean())
    assert gptq_mse < 0.7 * rtn_mse
    assert gptq_fid["agreement"] >= rtn_fid["agreement"]


def test_unreached_layer_falls_back_to_round_to_nearest():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    report = gptq_(model, GPTQ(bits=4, group_size=8), torch.randn(32, 8))
    assert report.quantized["used"]["method"] == "gptq"
    assert report.quantized["unused"]["method"] == "round-to-nearest"
    assert "not reached" in report.quantized["unused"]["reason"]
    assert isinstance(model.unused, IntQuantLayer)


def test_overrides_mix_gptq_with_other_configs_and_skips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    report = gptq_(model, GPTQ(bits=4, group_size=8), torch.randn(64, 16),
                   overrides={"2": ts.IntQuant(bits=8), "4": None})
    assert report.quantized["0"]["method"] == "gptq"
    assert report.quantized["2"]["type"] == "int" and model[2].bits == 8
    assert report.skipped["4"] == "override is None" and isinstance(model[4], nn.Linear)


def test_quantize_verb_runs_gptq_with_calibration_inputs_and_refuses_it_without():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 8)
    with pytest.raises(ConfigError, match=r"GPTQ needs calibration inputs: expected quantize_\(model, GPTQ"):
        ts.quantize_(model, GPTQ())
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ConfigError, match="calib_inputs is invalid with IntQuant"):
        ts.quantize_(model, ts.IntQuant(), calib_inputs=x)
    assert isinstance(model[0], nn.Linear)
    reference = copy.deepcopy(model)
    gptq_(reference, GPTQ(group_size=None), x)
    report = ts.quantize_(model, GPTQ(group_size=None), calib_inputs=x)  # the registered calibrated handler: gptq_
    assert {entry["method"] for entry in report.quantized.values()} == {"gptq"}
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_a_gptq_override_is_refused_before_any_layer_changes():
    # layers "0" and "2" come before "4" in the plan: an error only at "4" used to leave them quantized
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"layer '4' = GPTQ needs calibration inputs.*calib_inputs"):
        ts.quantize_(model, ts.IntQuant(bits=4), overrides={"4": GPTQ()})
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))


def test_gptq_on_a_model_with_nothing_to_quantize_raises_as_quantize_does():
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(ModelError, match="gptq_ found no layer to quantize in Sequential: looked for Linear"):
        gptq_(model, GPTQ(), torch.randn(4, 8))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bits": 9}, "bits"), ({"group_size": 1}, "group_size"), ({"damp": 0.0}, "damp"),
     ({"blocksize": 0}, "blocksize"), ({"scale_dtype": "int8"}, "scale_dtype"),
     ({"clip_search": "yes"}, "clip_search")],
)
def test_config_errors_name_field_and_value(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        GPTQ(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)


def test_bad_calibration_inputs_fail_before_any_change():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(DataError, match="fails on the calibration inputs"):
        gptq_(model, GPTQ(), torch.randn(4, 5))
    with pytest.raises(DataError, match="calib_inputs"):
        gptq_(model, GPTQ(), "text")
    assert isinstance(model[0], nn.Linear)
    assert GPTQ.from_dict(GPTQ(bits=3, act_order=True).to_dict()) == GPTQ(bits=3, act_order=True)


def test_layers_reading_one_input_are_each_their_own_gptq():
    class Pair(nn.Module):  # like q/k/v: two layers of different widths on the same tensor, quantized together
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 48), nn.Linear(64, 16)

        def forward(self, x):
            return self.a(x).sum(-1) + self.b(x).sum(-1)

    torch.manual_seed(0)
    model, x = Pair(), _correlated_inputs(512, 64)
    config = GPTQ(bits=3, group_size=32)
    expected = {n: gptq_quantize(getattr(model, n).weight, layer_hessian(getattr(model, n), x), config)[0]
                for n in ("a", "b")}
    gptq_(model, config, x)
    for name, weight in expected.items():
        torch.testing.assert_close(getattr(model, name).dequantize_weight(), weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [nn.Linear(100, 24), nn.Conv2d(6, 8, 3, bias=False)], ids=["linear", "conv"])
@pytest.mark.parametrize(("bits", "granularity", "group_size"),
                         [(4, "group", 32), (3, "group", 16), (8, "channel", None)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_from_codes_writes_the_bytes_from_qparams_writes_for_the_weight_the_codes_stand_for(
    module, bits, granularity, group_size, symmetric
):
    from torchslim.quantize.affine import compute_qparams, grouped_view

    torch.manual_seed(0)
    weight = module.weight.detach()
    rows = weight.shape[0]
    scale, zero_point = compute_qparams(grouped_view(weight, granularity, group_size, pad=True), bits, symmetric,
                                        torch.float16)
    fan_in = weight[0].numel()
    size = group_size or fan_in
    codes = torch.randint(0, 1 << bits, (rows, fan_in), dtype=torch.uint8)

    def per_column(t):
        return t.float().repeat_interleave(size, dim=1)[:, :fan_in]

    stand_for = ((codes.float() - per_column(zero_point)) * per_column(scale)).reshape(weight.shape)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.weight.copy_(stand_for)
    expected = IntQuantLayer.from_qparams(twin, scale, zero_point, bits, granularity, group_size, symmetric)
    layer = IntQuantLayer.from_codes(module, codes, scale, zero_point, bits, granularity, group_size, symmetric)
    for name, buffer in expected.state_dict().items():
        assert torch.equal(layer.state_dict()[name], buffer), name
    x = torch.randn(2, *((100,) if isinstance(module, nn.Linear) else (6, 7, 7)))
    assert torch.allclose(layer(x), twin(x), atol=1e-5)


def test_from_codes_rejects_a_tensor_granularity_and_misshapen_codes():
    layer = nn.Linear(16, 4)
    scale, zero_point = torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(ConfigError, match="granularity = 'tensor' is invalid for from_codes"):
        IntQuantLayer.from_codes(layer, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(1, 1), zero_point[:1],
                                 4, "tensor", None, False)
    with pytest.raises(ConfigError, match=r"codes shape \(4, 15\) is invalid: expected \(4, 16\)"):
        IntQuantLayer.from_codes(layer, torch.zeros(4, 15, dtype=torch.uint8), scale, zero_point, 4, "channel",
                                 None, False)


def test_gptq_of_a_row_with_a_tiny_range_stays_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[3] *= 1e-8  # its float16 min/max scale would underflow to 0
    original = model[0].weight.detach().clone()
    gptq_(model, GPTQ(bits=4, group_size=32), _correlated_inputs(256, 64))
    restored = model[0].dequantize_weight()
    assert bool(torch.isfinite(restored).all())
    assert float((restored[3] - original[3]).abs().max()) < 1e-6

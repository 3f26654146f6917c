import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.errors import ConfigError
from torchslim.quantize.affine import compute_qparams, dequantize_affine, grouped_view, quantize_affine


def inside_clipping_range(grouped, scale, zp, bits):
    """Elements whose value lies in the representable range [(0 - zp) * s, (qmax - zp) * s]."""
    low = (-zp.float() * scale.float()).unsqueeze(-1)
    high = (((1 << bits) - 1 - zp.float()) * scale.float()).unsqueeze(-1)
    return (grouped >= low) & (grouped <= high)


weights = st.builds(
    lambda seed, rows, cols, spread: torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread,
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.sampled_from([4, 8, 12]),
    st.floats(1e-3, 10.0),
)


@settings(max_examples=80, deadline=None)
@given(
    w=weights,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
)
def test_nearest_error_is_at_most_half_a_step_inside_the_range(w, bits, symmetric, granularity):
    grouped = grouped_view(w, granularity, group_size=4)
    scale, zp = compute_qparams(grouped, bits, symmetric)
    codes = quantize_affine(grouped, scale, zp, bits, "nearest")
    restored = dequantize_affine(codes, scale, zp)
    step = scale.unsqueeze(-1)
    inside = inside_clipping_range(grouped, scale, zp, bits)
    error = (restored - grouped).abs()
    assert bool((error[inside] <= step.expand_as(error)[inside] * 0.5 * (1 + 1e-5) + 1e-7).all())
    if not symmetric:  # asymmetric min/max with a rounded zero point clips by at most half a step
        assert bool((error <= step * 0.5 * (1 + 1e-5) + 1e-7).all())


@settings(max_examples=80, deadline=None)
@given(w=weights, bits=st.integers(2, 8))
def test_floor_error_is_below_one_step_and_never_rounds_up(w, bits):
    grouped = grouped_view(w, "channel")
    scale, zp = compute_qparams(grouped, bits, symmetric=False)
    codes = quantize_affine(grouped, scale, zp, bits, "floor")
    restored = dequantize_affine(codes, scale, zp)
    step = scale.unsqueeze(-1)
    diff = grouped - restored
    inside = inside_clipping_range(grouped, scale, zp, bits)
    assert bool((diff[inside] >= -1e-6 * step.expand_as(diff)[inside]).all())
    assert bool((diff[inside] < step.expand_as(diff)[inside] * (1 + 1e-5)).all())


@settings(max_examples=50, deadline=None)
@given(w=weights, bits=st.integers(2, 8), rounding=st.sampled_from(["nearest", "floor"]))
def test_codes_match_the_seed_formula_element_for_element(w, bits, rounding):
    grouped = grouped_view(w, "tensor")
    scale, zp = compute_qparams(grouped, bits, symmetric=False)
    k = 1.0 / float(scale)
    b = float(zp) + (0.5 if rounding == "nearest" else 0.0)
    qmax = (1 << bits) - 1
    expected = [min(max(math.floor(x * k + b), 0), qmax) for x in grouped.flatten().tolist()]
    codes = quantize_affine(grouped, scale, zp, bits, rounding).flatten().tolist()
    # float32 vs float64 evaluation may differ exactly at a .5 boundary; allow none beyond off-by-one
    mismatches = [(c, e) for c, e in zip(codes, expected, strict=True) if c != e]
    assert all(abs(c - e) == 1 for c, e in mismatches)
    assert len(mismatches) <= max(1, len(codes) // 100)


def test_floor_rounding_is_biased_low_by_half_a_step_and_nearest_is_not():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    grouped = grouped_view(w, "channel")
    scale, zp = compute_qparams(grouped, 4, symmetric=False)
    step = scale.unsqueeze(-1)
    floor_bias = (dequantize_affine(quantize_affine(grouped, scale, zp, 4, "floor"), scale, zp) - grouped) / step
    nearest_bias = (dequantize_affine(quantize_affine(grouped, scale, zp, 4, "nearest"), scale, zp) - grouped) / step
    assert floor_bias.mean().item() == pytest.approx(-0.5, abs=0.05)
    assert abs(nearest_bias.mean().item()) < 0.05


def test_zero_is_exact_and_symmetric_zero_point_is_mid_range():
    w = torch.tensor([[0.0, 0.3, -1.2, 2.0]])
    for symmetric in (False, True):
        grouped = grouped_view(w, "channel")
        scale, zp = compute_qparams(grouped, 4, symmetric)
        restored = dequantize_affine(quantize_affine(grouped, scale, zp, 4), scale, zp)
        assert restored[0, 0, 0].item() == 0.0
    _, zp = compute_qparams(grouped_view(w, "channel"), 4, symmetric=True)
    assert zp.item() == 8


def test_grouped_view_shapes_and_errors():
    w = torch.randn(6, 3, 4, 4)
    assert grouped_view(w, "tensor").shape == (1, 1, 288)
    assert grouped_view(w, "channel").shape == (6, 1, 48)
    assert grouped_view(w, "group", 16).shape == (6, 3, 16)
    with pytest.raises(ConfigError, match=r"group_size = 32 is invalid .* divisor of its input dimension 48"):
        grouped_view(w, "group", 32)
    with pytest.raises(ConfigError, match="granularity = 'row'"):
        grouped_view(w, "row")
    with pytest.raises(ConfigError, match="rounding = 'up'"):
        quantize_affine(grouped_view(w, "tensor"), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), 4, "up")


def test_all_zero_weight_does_not_divide_by_zero():
    grouped = grouped_view(torch.zeros(3, 8), "channel")
    scale, zp = compute_qparams(grouped, 4, symmetric=False)
    restored = dequantize_affine(quantize_affine(grouped, scale, zp, 4), scale, zp)
    assert torch.equal(restored, grouped)


def test_a_tiny_range_keeps_a_positive_float16_scale():
    # 1e-9 / 15 underflows float16 to 0, and 1/0 would turn every code of the row into inf/nan
    grouped = grouped_view(torch.tensor([[1e-9, -1e-9, 0.0, 5e-10], [1.0, -1.0, 0.5, 0.0]]), "channel")
    scale, zp = compute_qparams(grouped, 4, symmetric=False, scale_dtype=torch.float16)
    assert bool((scale > 0).all()) and bool(torch.isfinite(1.0 / scale.float()).all())
    restored = dequantize_affine(quantize_affine(grouped, scale, zp, 4), scale, zp)
    assert float((restored - grouped).abs().max()) < 0.1

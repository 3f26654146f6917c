"""Shared internal helpers: modes restored, devices, one logits rule, one-line errors, pixel shifts, float layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import _utils
from torchslim._utils import (
    cpu_has_int8_dot_product,
    device_of,
    eval_mode,
    first_line,
    logits_of,
    shift_images,
    train_mode,
)
from torchslim.distill.synthetic import shifted_views
from torchslim.errors import ModelError
from torchslim.quantize.api import IntQuant
from torchslim.quantize.layers import HalfLayer, IntQuantLayer
from torchslim.quantize.qat import QATLayer


def test_eval_mode_restores_each_modules_own_mode_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    other = nn.Linear(2, 2)
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model, other):
        assert not any(m.training for m in (*model.modules(), other))
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert other.training
    with train_mode(model):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu avx2 fma avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True), ("fpu avx2 amx_int8", True),
    ("fpu avx2 fma avx512f", False), (None, False),
])
def test_cpu_has_int8_dot_product_reads_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(_utils.platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:  # None: the file cannot be read
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n")
    assert cpu_has_int8_dot_product(str(cpuinfo)) is expected
    monkeypatch.setattr(_utils.platform, "machine", lambda: "aarch64")
    assert cpu_has_int8_dot_product(str(cpuinfo)) is True


def test_device_of_reads_parameters_then_buffers_else_the_cpu():
    assert device_of(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = nn.Module()
    buffers_only.register_buffer("table", torch.zeros(2, device="meta"))
    assert device_of(buffers_only) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")


class _HFOutput:
    def __init__(self, logits):
        self.logits = logits


def test_logits_of_one_rule_for_tensors_hf_outputs_and_tuples():
    x = torch.randn(2, 3)
    assert logits_of(x) is x
    assert logits_of(_HFOutput(x)) is x
    assert logits_of((x, torch.zeros(1))) is x
    assert logits_of([x]) is x
    with pytest.raises(ModelError, match=r"perplexity: the model returns a dict: expected logits"):
        logits_of({"logits": x}, "perplexity")
    with pytest.raises(ModelError, match="returns a tuple"):
        logits_of(())


def test_first_line_of_an_exception():
    assert first_line(ValueError("  first\nsecond  ")) == "first"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("x" * 500), 300) == "x" * 300


def _shift_by_slicing(x, dy, dx, pad):
    """The implementation the helper replaced (one image, one offset)."""
    h, w = x.shape[-2:]
    padded = F.pad(x[None], (pad,) * 4, mode="replicate")[0]
    return padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def test_shift_images_moves_each_image_by_its_own_offset_with_edges_replicated():
    x = torch.randn(5, 2, 6, 7)
    offsets = torch.tensor([[0, 0], [1, -2], [-3, 3], [2, 0], [0, -1]])
    out = shift_images(x, offsets)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], _shift_by_slicing(x[i], dy, dx, 3))
    assert torch.equal(out[1, :, 1:, :5], x[1, :, :-1, 2:])  # content moved down 1, left 2
    assert torch.equal(shift_images(x, torch.tensor([[0, 0]])), x)
    one = shift_images(x, torch.tensor([[1, 1]]))  # one offset for every image
    assert all(torch.equal(one[i], _shift_by_slicing(x[i], 1, 1, 1)) for i in range(5))


def test_shifted_views_keep_their_order_and_values():
    x = torch.randn(3, 1, 5, 5)
    views = shifted_views(x, 1)
    expected = [_shift_by_slicing(x[i], dy, dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) for i in range(3)]
    assert torch.equal(views, torch.stack(expected))


@pytest.mark.parametrize("source", [nn.Linear(8, 4), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)])
@pytest.mark.parametrize("kind", ["int4", "half", "qat"])
def test_to_float_computes_what_the_packed_layer_computes(source, kind):
    torch.manual_seed(0)
    x = torch.randn(2, 8) if isinstance(source, nn.Linear) else torch.randn(2, 4, 7, 7)
    if kind == "int4":
        layer = IntQuantLayer.from_float(source, 4, "group", 4, symmetric=False)
    elif kind == "half":
        layer = HalfLayer.from_float(source)
    else:
        layer = QATLayer.from_float(source, IntQuant(bits=4, granularity="channel"))
    plain = layer.to_float()
    assert type(plain) is type(source) and not plain.training
    expected = layer.run(x, layer.weight) if kind == "qat" else layer.eval()(x)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-6)

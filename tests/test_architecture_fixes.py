"""Fixes found by the architecture coverage table: token-id int8, weight_norm layers, MultiheadAttention in fp16."""

from __future__ import annotations

import torch
from torch import nn

import torchslim as ts


class _Ids(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids)).mean(dim=1)


class _WeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 8, 3))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=2))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def test_quantize_dynamic_keeps_a_single_token_id_input_integer():
    torch.manual_seed(0)
    model = _Ids().eval()
    ids = torch.randint(0, 50, (2, 6))
    graph = ts.quantize_dynamic(model, example_inputs=ids)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(graph(ids).flatten(), model(ids).flatten(), dim=0) > 0.99


def test_weight_norm_layer_is_skipped_by_unstructured_pruning_and_the_model_saves(tmp_path):
    torch.manual_seed(0)
    model = _WeightNorm().eval()
    report = ts.prune_(model, ts.MagnitudePruning(scope="layer", amount=0.5))
    ts.finalize_(model)
    assert "parametrized" in report.skipped["conv"]
    assert int((model.fc.weight == 0).sum()) == 8
    x = torch.randn(2, 4, 10)
    path = ts.save(model, tmp_path / "wn.slim", factory={"name": f"{__name__}:_WeightNorm", "kwargs": {}})
    with torch.no_grad():
        assert torch.equal(ts.load(path, trust_factory=True)(x), model(x))


def test_fp16_keeps_multihead_attention_out_proj_and_runs():
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    report = ts.quantize_(model, ts.HalfPrecision("fp16"))
    assert "MultiheadAttention" in report.skipped["attn.out_proj"]
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-2)


def test_int4_skips_a_weight_norm_layer_with_a_reason():
    torch.manual_seed(0)
    model = _WeightNorm().eval()
    report = ts.quantize_(model, ts.IntQuant(bits=4))
    assert "parametrized" in report.skipped["conv"]
    assert model(torch.randn(2, 4, 10)).shape == (2, 2)

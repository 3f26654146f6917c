from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

from torchslim.errors import ModelError
from torchslim.measure import parameter_stats
from torchslim.measure.size import artifact_bytes


class Packed(nn.Module):
    """Stands in for a packed quantized layer: its own tensors are not what it logically holds."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(50, 50)  # must not be counted: slim_stats speaks for the module
        self.register_buffer("packed", torch.zeros(200, dtype=torch.uint8))

    def slim_stats(self) -> dict:
        return {"parameters": 400, "nonzero": 300, "storage_bits": 1600}


def test_counts_parameters_nonzeros_and_bytes():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[:, :4] = 0  # 5 * 4 = 20 zeros
        model[2].bias.zero_()  # 2 zeros
    stats = parameter_stats(model)
    assert stats == {"parameters": 67, "nonzero": 67 - 22, "fp32_bytes": 4 * 67, "storage_bits": 67 * 32}


def test_storage_bits_follow_dtype():
    model = nn.Linear(8, 4).half()
    stats = parameter_stats(model)
    assert stats["parameters"] == 36
    assert stats["storage_bits"] == 36 * 16
    assert stats["fp32_bytes"] == 36 * 4


def test_shared_parameter_counted_once():
    first = nn.Linear(6, 6, bias=False)
    second = nn.Linear(6, 6, bias=False)
    second.weight = first.weight
    assert parameter_stats(nn.Sequential(first, second))["parameters"] == 36


def test_slim_stats_module_counted_as_declared_without_children():
    model = nn.Sequential(Packed(), nn.Linear(3, 2))
    stats = parameter_stats(model)
    assert stats["parameters"] == 400 + 8
    assert stats["nonzero"] == 300 + int((model[1].weight != 0).sum()) + int((model[1].bias != 0).sum())
    assert stats["storage_bits"] == 1600 + 8 * 32
    assert stats["fp32_bytes"] == 4 * 408


def test_bad_slim_stats_names_the_module():
    class Broken(nn.Module):
        def slim_stats(self):
            return {"parameters": 3}

    with pytest.raises(ModelError, match=r"0\.slim_stats\(\).*storage_bits"):
        parameter_stats(nn.Sequential(Broken()))


def test_artifact_bytes_is_the_saved_file_size_and_cleans_up(tmp_path, monkeypatch):
    import torchslim.artifact as artifact
    from torchslim.testing import tiny_mlp

    model = tiny_mlp()
    reference = artifact.save(model, tmp_path / "ref.slim")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    size = artifact_bytes(model)
    assert size == os.path.getsize(reference)
    assert size > 4 * parameter_stats(model)["parameters"] * 0.9
    assert list(scratch.iterdir()) == []

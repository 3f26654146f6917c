from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim.measure.api as api
from torchslim.errors import ArtifactError, DataError
from torchslim.measure import Measurement, format_measurement, measure
from torchslim.testing import blobs, tiny_mlp


def requires_artifact():
    import torchslim.artifact as artifact

    return artifact


@pytest.fixture
def no_artifact(monkeypatch):
    """Make saving fail the way an unsaveable model does, so the in-memory fallback is used."""

    def refuse(model):
        raise ArtifactError("cannot save this model")

    monkeypatch.setattr(api, "saved_artifact", refuse)


def hand_accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_measure_without_artifact_counts_everything_else(no_artifact):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
    data = blobs(n=64)
    with pytest.warns(UserWarning, match="could not be saved"):
        m = measure(model, data, reference=model, batch_sizes=(1, 3))
    assert m.artifact_bytes is None and m.compression_ratio is None
    assert m.parameters == 16 * 32 + 32 + 32 * 4 + 4 == 676
    assert m.fp32_bytes == 4 * 676
    assert m.bits_per_weight == 32.0
    assert m.macs == 16 * 32 + 32 * 4
    assert m.accuracy == pytest.approx(hand_accuracy(copy.deepcopy(model), data))
    assert m.agreement == 1.0 and m.cosine == pytest.approx(1.0)
    assert set(m.latency) == {1, 3} and all(s["median_ms"] > 0 for s in m.latency.values())
    assert m.peak_memory_bytes is not None and m.peak_memory_bytes >= m.fp32_bytes
    assert model.training


@pytest.mark.parametrize("wrap", ["loader", "splits"])
def test_measure_accepts_loader_and_splits(no_artifact, wrap):
    model = nn.Sequential(nn.Linear(16, 4))
    data = blobs(n=40)
    source = DataLoader(data, batch_size=16) if wrap == "loader" else types.SimpleNamespace(test=data)
    with pytest.warns(UserWarning):
        m = measure(model, source, latency=False)
    assert m.accuracy == pytest.approx(hand_accuracy(copy.deepcopy(model), data))
    assert m.macs == 64 and m.latency == {}


def test_measure_without_data_or_inputs(no_artifact):
    with pytest.warns(UserWarning):
        m = measure(nn.Linear(4, 2))
    assert (m.macs, m.accuracy, m.agreement, m.peak_memory_bytes, m.latency) == (None, None, None, None, {})
    assert m.parameters == 10


def test_measure_unlabelled_inputs_give_fidelity_not_accuracy(no_artifact):
    model = nn.Linear(4, 3)
    with pytest.warns(UserWarning):
        m = measure(model, torch.randn(10, 4), reference=model, latency=False)
    assert m.accuracy is None and m.agreement == 1.0 and m.macs == 12


def test_reference_without_inputs_raises(no_artifact):
    model = nn.Linear(4, 3)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="reference"):
        measure(model, reference=model)


def test_empty_data_raises(no_artifact):
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no samples"):
        measure(nn.Linear(4, 3), empty, example_inputs=torch.randn(1, 4), latency=False)


def test_missing_artifact_path_raises(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        measure(nn.Linear(4, 2), artifact_path=tmp_path / "nope.slim", latency=False)


def test_to_dict_is_json_safe_and_round_trips():
    m = Measurement(
        artifact_bytes=1000, fp32_bytes=4000, parameters=1000, nonzero_parameters=250, bits_per_weight=8.0,
        macs=900, accuracy=0.5,
        latency={1: {"median_ms": 1.0, "p90_ms": 2.0, "throughput_per_s": 1000.0, "runs": 3}},
    )
    d = json.loads(json.dumps(m.to_dict()))
    assert d["latency"]["1"]["p90_ms"] == 2.0
    assert d["compression_ratio"] == 4.0 and d["sparsity"] == 0.75
    assert Measurement.from_dict(d) == m


def test_format_measurement_rows():
    m = Measurement(
        artifact_bytes=3 * 1024 * 1024, fp32_bytes=12 * 1024 * 1024, parameters=3_145_728,
        nonzero_parameters=314_573, bits_per_weight=3.2, macs=1_000_000, accuracy=None, agreement=0.985,
        cosine=0.99871,
        latency={32: {"median_ms": 1.5, "p90_ms": 1.75, "throughput_per_s": 21333.3, "runs": 9}},
        peak_memory_bytes=1536,
    )
    rows = dict(format_measurement(m))
    assert rows["artifact size"] == "3.0 MiB"
    assert rows["fp32 weights"] == "12.0 MiB"
    assert rows["compression"] == "4.00x vs fp32"
    assert rows["parameters"] == "3,145,728"
    assert rows["sparsity"] == "90.00%"
    assert rows["bits per weight"] == "3.20"
    assert rows["MACs per sample"] == "1,000,000"
    assert rows["top-1 agreement"] == "98.50%"
    assert rows["logit cosine"] == "0.9987"
    assert rows["latency (batch 32)"] == "1.500 ms median, 1.750 ms p90, 21,333 samples/s"
    assert rows["peak memory"] == "1.5 KiB"
    assert "accuracy" not in rows  # not measured -> no row


def test_package_is_callable_as_measure(no_artifact):
    import torchslim as ts

    with pytest.warns(UserWarning):
        m = ts.measure(nn.Linear(4, 2), latency=False)
    assert isinstance(m, Measurement) and m.parameters == 10


# --- with the real artifact ---------------------------------------------------------------------


def test_artifact_bytes_match_saved_file(tmp_path):
    artifact = requires_artifact()
    model = tiny_mlp(features=16, hidden=32, num_classes=4)
    path = artifact.save(model, tmp_path / "model.slim")
    given = measure(model, blobs(n=32), artifact_path=path, latency=False)
    assert given.artifact_bytes == os.path.getsize(path)
    assert given.compression_ratio == pytest.approx(given.fp32_bytes / os.path.getsize(path))
    # dense fp32 MLP without buffers: the stored tensors are exactly the fp32 weights
    assert given.bits_per_weight == pytest.approx(32.0)
    assert given.macs == 16 * 32 + 32 * 4
    temporary = measure(model, blobs(n=32), latency=False)
    assert abs(temporary.artifact_bytes - os.path.getsize(path)) <= 64


def test_sparse_model_has_fewer_bits_per_weight():
    artifact = requires_artifact()
    torch.manual_seed(0)
    dense = tiny_mlp(features=64, hidden=256, num_classes=10)
    sparse = copy.deepcopy(dense)
    with torch.no_grad():
        for p in sparse.parameters():
            flat = p.view(-1)
            keep = torch.randperm(flat.numel())[: max(1, flat.numel() // 10)]
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[keep] = True
            flat[~mask] = 0
    m_dense = measure(dense, latency=False)
    m_sparse = measure(sparse, latency=False)
    assert m_sparse.sparsity == pytest.approx(0.9, abs=0.01)
    with api.saved_artifact(sparse) as path:
        encodings = {row["encoding"] for row in artifact.tensor_table(path)}
    assert encodings != {"dense"}  # the 90%-zero weights are stored in a sparse encoding
    # bitmask (1 bit) + 10% fp32 values (3.2 bits) ~ 4.2 bits per weight instead of 32
    assert m_dense.bits_per_weight == pytest.approx(32.0)
    assert m_sparse.bits_per_weight < 6.0
    assert m_sparse.artifact_bytes < m_dense.artifact_bytes / 4


class _TwoInputs(nn.Module):
    """A model called as model(ids, mask), like a token model."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.head((self.embed(ids) * mask.unsqueeze(-1)).sum(1))


def test_measure_times_a_model_with_several_inputs(no_artifact):
    model = _TwoInputs().eval()
    ids, mask = torch.randint(0, 50, (1, 6)), torch.ones(1, 6)
    with pytest.warns(UserWarning):
        m = measure(model, example_inputs=(ids, mask), batch_sizes=(1, 4))
    assert set(m.latency) == {1, 4} and all(s["median_ms"] > 0 for s in m.latency.values())

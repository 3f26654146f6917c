from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.measure import measure_latency


class Recorder(nn.Module):
    """Records how it was called: batch sizes, mode, inference mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.calls: set[tuple[int, bool, bool]] = set()

    def forward(self, x):
        self.calls.add((x.shape[0], self.training, torch.is_inference_mode_enabled()))
        return self.linear(x)


def test_latency_structure_and_values():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    result = measure_latency(model, torch.randn(1, 32), batch_sizes=(1, 4), min_run_time=0.01, warmup=1)
    assert set(result) == {1, 4}
    for batch, stats in result.items():
        assert set(stats) == {"median_ms", "p90_ms", "throughput_per_s", "runs"}
        assert stats["median_ms"] > 0
        assert stats["p90_ms"] >= stats["median_ms"]
        assert stats["runs"] >= 1
        assert stats["throughput_per_s"] == pytest.approx(batch / (stats["median_ms"] / 1e3))


def test_batches_built_from_examples_in_eval_inference_mode_and_mode_restored():
    model = Recorder().train()
    measure_latency(model, torch.randn(2, 8), batch_sizes=(1, 5), min_run_time=0.005, warmup=1)
    assert {batch for batch, _, _ in model.calls} == {1, 5}
    assert all(not training and inference for _, training, inference in model.calls)
    assert model.training and model.linear.training


def test_threads_restored():
    before = torch.get_num_threads()
    measure_latency(nn.Linear(4, 4), torch.randn(1, 4), batch_sizes=(2,), num_threads=1, min_run_time=0.005)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": (0,)}, "batch_sizes"),
        ({"num_threads": 0}, "num_threads"),
        ({"min_run_time": 0}, "min_run_time"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_latency(nn.Linear(4, 4), torch.randn(1, 4), **kwargs)

"""``torchslim bench --json``: rows parse, the baseline is included, speedups are present."""

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli.main import main


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_cli") / "pruned.slim"
    torch.manual_seed(0)
    model = ts.create_model("lenet5").eval()
    ts.prune_(model, ts.ChannelPruning(amount=0.5), example_inputs=torch.randn(2, 1, 28, 28))
    ts.save(model, path)
    return path


FAST = ["--threads", "1", "--warmup", "1", "--min-run-time", "0.01"]


def test_bench_json_has_the_baseline_beside_each_runtime(slim, capsys):
    code = main(["bench", str(slim), "--data", "digits", "--batch", "1,2", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    rows = report["rows"]
    fields = {"name", "runtime", "batch", "median_ms", "p90_ms", "throughput_per_s", "peak_memory_bytes",
              "speedup_vs_baseline", "speedup_vs_torch_fp32", "baseline"}  # fmt: skip
    assert all(set(row) == fields for row in rows)
    baseline = [row for row in rows if row["baseline"]]
    expected = {(runtime, batch) for runtime in ("torch", "onnxruntime") for batch in (1, 2)}
    assert {(r["runtime"], r["batch"]) for r in baseline} == expected
    assert all(r["speedup_vs_baseline"] == 1.0 for r in baseline)
    assert {r["name"] for r in rows if not r["baseline"]} == {"pruned.slim"}
    assert all(r["speedup_vs_baseline"] > 0 for r in rows)
    assert "lenet5 rebuilt from its factory" in report["baseline"]["how"]


def test_bench_table_and_bad_runtime(slim, capsys):
    code = main(["bench", str(slim), "--input-shape", "1,28,28", "--runtime", "torch", "--batch", "1", "--no-memory",
                 *FAST])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "fp32 baseline" in out and "vs baseline" in out
    code = main(["bench", str(slim), "--input-shape", "1,28,28", "--runtime", "gpu"])
    assert code == 2 and "runtimes = ('gpu',) is invalid" in capsys.readouterr().err

"""A fast subset of the architecture coverage table (``benchmarks/coverage.py`` runs all of it).

Every cell must be ✓ within the operation's tolerance, or ✗ with a torchslim error: never an arbitrary exception
(``crash``) and never outputs beyond the tolerance (``wrong``).
"""

from __future__ import annotations

import pytest

from torchslim.coverage import runner
from torchslim.coverage.zoo import ARCHITECTURES, build
from torchslim.errors import ModelError, TorchSlimError

# one of each way a model reaches torchslim: ts.load_hf (encoder, decoder), a user wrapper, user modules
FAST_ARCHS = ("bert", "llama", "vit", "grouped-conv", "two-inputs", "tied-weights")
FAST_OPS = tuple(op for op in runner.OPERATIONS if op != "deploy")


def _failures(table):
    return {
        (arch, op): f"{cell.status}: {cell.message}"
        for arch, row in table.items()
        for op, cell in row.items()
        if cell.status not in ("ok", "error")
    }


@pytest.mark.slow  # about a minute of CPU: 6 architectures x 9 operations and one reload process
def test_subset_has_no_crash_and_no_wrong_outputs(tmp_path):
    table = runner.run_table(FAST_ARCHS, FAST_OPS, workdir=tmp_path)
    assert _failures(table) == {}
    # the reload in a new process ran and compared every saved variant
    assert all(row["save-load"].message.startswith("identical") for row in table.values())
    # most cells pass; a ✗ cell carries the one line a user sees
    assert sum(cell.ok for row in table.values() for cell in row.values()) >= 0.9 * len(FAST_ARCHS) * len(FAST_OPS)
    assert all(cell.message for row in table.values() for cell in row.values() if not cell.ok)


@pytest.mark.slow
def test_deploy_subset(tmp_path):
    table = runner.run_table(("gpt2", "conv1d"), ("deploy",), workdir=tmp_path)
    assert _failures(table) == {}
    assert all(row["deploy"].ok for row in table.values()), table


def test_cell_status_separates_torchslim_errors_from_crashes_and_wrong_outputs(tmp_path, monkeypatch):
    def torchslim_error(ctx):
        raise ModelError("model: layer 'x' is unsupported")

    def crash(ctx):
        raise KeyError("boom")

    def wrong(ctx):
        return runner._close("fp16", ctx.model, ctx.inputs, -ctx.ref)

    for name, fn in (("int4", torchslim_error), ("gptq", crash), ("fp16", wrong)):
        monkeypatch.setitem(runner._OPERATIONS, name, fn)
    table = runner.run_table(("conv1d",), ("int4", "gptq", "fp16", "onnx"), workdir=tmp_path)
    row = table["conv1d"]
    assert (row["int4"].status, row["int4"].message) == ("error", "model: layer 'x' is unsupported")
    assert (row["gptq"].status, row["gptq"].message) == ("crash", "KeyError: 'boom'")
    assert row["fp16"].status == "wrong" and "cosine -1.0000 < 0.999" in row["fp16"].message
    assert row["onnx"].ok
    text = runner.to_markdown(table)
    assert "| conv1d | user | user module (Conv1d) | ✗ [1] | ✗ crash [2] | ✗ wrong [3] | ✓ |" in text
    assert "1. model: layer 'x' is unsupported" in text
    assert "1/1 (100%)" in text and "0/1 (0%)" in text


def test_zoo_covers_the_issue_families():
    families = {arch.family for arch in ARCHITECTURES.values()}
    assert families == {"encoder", "decoder", "encoder-decoder", "vision", "audio", "torchslim", "user"}
    assert len(ARCHITECTURES) >= 25
    with pytest.raises(TorchSlimError, match="arch = 'nope' is not built by this factory"):
        build("nope")

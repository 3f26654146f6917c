"""The demo end to end in a tiny setting: every row, the report (inline PNGs), plots, .slim and .onnx files."""

import json

import pytest

from torchslim.artifact import load
from torchslim.pipeline.demo import PRESETS, DemoSettings, run_demo

TINY = DemoSettings("tiny", baseline_epochs=1, lenet300_epochs=1, teacher_widths=(8, 16), teacher_blocks=(1, 1),
                    teacher_epochs=1, student_epochs=1, cached_logits=True, finetune_epochs=1, qat_epochs=1,
                    taus=(0.05,), bits=(4,), latency=False, train_images=400)
ROWS = ["lenet5", "lenet300", "resnet", "lenet5-int4", "lenet5-int4-floor", "lenet5-fp16", "lenet5-tau0.05-finetuned",
        "student_cnn-kd", "lenet5-int8-static", "lenet5-combined"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    return run_demo(out, settings=TINY, progress=False, say=lines.append), out, lines


def test_demo_table_has_every_row_measured(demo):
    report, _, lines = demo
    assert [r["name"] for r in report.results] == ROWS
    cells = {row[0]: row for row in report.table_rows()}
    assert set(cells) == set(ROWS)
    by_name = {r["name"]: r["measurement"] for r in report.results}
    fp32 = by_name["lenet5"]["artifact_bytes"]
    assert by_name["lenet5-int4"]["artifact_bytes"] < fp32 / 6  # 4-bit codes + scales
    assert by_name["lenet5-fp16"]["artifact_bytes"] < fp32 / 1.9
    assert by_name["lenet5-combined"]["artifact_bytes"] < fp32 / 20
    assert by_name["lenet5-tau0.05-finetuned"]["sparsity"] > 0.5
    assert all(0 <= m["accuracy"] <= 1 for m in by_name.values())
    assert any(line.startswith("trained resnet (") for line in lines)  # per-step timings are reported


def test_demo_writes_a_self_contained_report_and_plots(demo, check_html):
    report, out, _ = demo
    names = sorted(p.name for p in report.plots)
    assert names == ["accuracy_vs_bits.png", "accuracy_vs_size.png", "sparsity_vs_tau.png"]
    check_html(report.html_path, 3)
    markdown = report.markdown_path.read_text()
    assert "tiny settings" in markdown and "| lenet5-combined |" in markdown
    assert "removes" in markdown  # what tau = 0.05 removes on this model is stated
    data = json.loads(report.json_path.read_text())
    assert data["settings"]["name"] == "tiny" and set(data["timings"]) >= {"trained lenet5", "swept tau and bits"}


def test_demo_artifacts_load_and_onnx_files_exist(demo):
    report, out, _ = demo
    for name in ROWS:
        assert load(out / f"{name}.slim") is not None
    assert sorted(p.name for p in report.onnx) == ["lenet5-int8-static.onnx", "lenet5.onnx", "model-int8-static.onnx"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in report.onnx)


def test_presets_and_exclusive_flags(tmp_path):
    assert PRESETS["default"].teacher_widths == PRESETS["full"].teacher_widths == (32, 64, 128, 256)  # registry's
    assert PRESETS["default"].cached_logits and not PRESETS["full"].cached_logits
    assert PRESETS["quick"].baseline_epochs < PRESETS["default"].baseline_epochs
    with pytest.raises(ValueError, match="quick and full are exclusive"):
        run_demo(tmp_path, quick=True, full=True)
    assert not any(tmp_path.iterdir())

"""Reports: self-contained HTML (every image an inline PNG), markdown, plots, rebuilt from saved measurements."""

import subprocess
from pathlib import Path

import pytest

from torchslim.errors import TorchSlimError
from torchslim.pipeline.report import load_report_data, write_report


def entry(name, size, accuracy, b1=1.0):
    return {"name": name, "artifact": f"{name}.slim", "runtime": "torch",
            "measurement": {"artifact_bytes": size, "accuracy": accuracy, "parameters": 1000, "nonzero_parameters": 500,
                            "bits_per_weight": 8.0 * size / 1000, "macs": 2000,
                            "latency": {"1": {"median_ms": b1}, "32": {"median_ms": 4 * b1}}}}


DATA = {
    "title": "test report", "intro": ["<b>escaped</b>"], "baseline": "fp32",
    "results": [entry("fp32", 4000, 0.99), entry("int4", 600, 0.985, 0.5), entry("bad", 3000, 0.9, 2.0)],
    "sweeps": {
        "tau": [{"label": "fp32", "threshold": None, "sparsity": 0.0, "file_bytes": 4000, "accuracy": 0.99,
                 "layers": {}},
                {"label": "tau=0.05", "threshold": 0.05, "sparsity": 0.8, "file_bytes": 1500, "accuracy": 0.98,
                 "layers": {}}],
        "bits": [{"label": "fp32", "bits": None, "accuracy": 0.99, "file_bytes": 4000, "bits_per_weight": 32},
                 {"label": "4-bit", "bits": 4, "accuracy": 0.98, "file_bytes": 600, "bits_per_weight": 4.8}],
    },
    "planner": {"summary": "s", "points": [{"label": "a", "file_bytes": 100, "accuracy": 0.99, "ok": True},
                                           {"label": "b", "file_bytes": 50, "accuracy": 0.9, "ok": False}],
                "front": [0, 1], "chosen": 0, "accuracy_floor": 0.985},
}


def test_report_files_are_self_contained(tmp_path, check_html):
    files = write_report(tmp_path, DATA)
    assert sorted(p.name for p in files["plots"]) == ["accuracy_vs_bits.png", "accuracy_vs_size.png",
                                                      "planner_points.png", "sparsity_vs_tau.png"]
    check_html(files["html"], 4)
    html = files["html"].read_text()
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html and "<b>escaped" not in html
    markdown = files["markdown"].read_text()
    assert "| int4 | 98.50% | 600 | 6.67x |" in markdown  # ratio vs the fp32 row
    assert "2.00x" in markdown  # batch-1 speedup of int4
    assert "![" in markdown and "accuracy_vs_size.png" in markdown


def test_report_rebuilds_from_saved_measurements(tmp_path, check_html):
    write_report(tmp_path, DATA)
    for name in ("report.md", "report.html", "accuracy_vs_size.png"):
        (tmp_path / name).unlink()
    files = write_report(tmp_path)
    assert (tmp_path / "report.md").read_text().count("| int4 |") == 1
    check_html(files["html"], 4)
    assert load_report_data(tmp_path)["results"][1]["ratio_vs_baseline"] == pytest.approx(4000 / 600)


def test_report_of_an_empty_directory_names_the_expected_files(tmp_path):
    with pytest.raises(TorchSlimError, match="holds no report.json or compress.json"):
        write_report(tmp_path)
    with pytest.raises(TorchSlimError, match="is not a directory"):
        write_report(tmp_path / "missing")


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no /usr/bin/chromium to render with")
def test_report_renders_in_a_headless_browser(tmp_path):
    files = write_report(tmp_path, DATA)
    shot = tmp_path / "shot.png"
    subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    files["html"].resolve().as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

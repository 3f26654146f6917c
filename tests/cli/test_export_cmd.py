"""``torchslim export``: each mode from a .slim, JSON report, loud errors before any work."""

import copy
import json

import pytest

import torchslim as ts
from torchslim.cli.main import main


@pytest.fixture(scope="module")
def slim(tmp_path_factory, trained_lenet5):
    # a trained model: an untrained one's logits are nearly tied, so int8 parity's top-1 agreement is a coin toss
    path = tmp_path_factory.mktemp("export_cli") / "lenet5.slim"
    ts.save(copy.deepcopy(trained_lenet5), path)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "op"),
    [
        (["--quant", "int8-static", "--calib", "digits"], "QuantizeLinear"),
        (["--quant", "int8-dynamic", "--data", "digits"], "MatMulInteger"),
        (["--quant", "int4-weight", "--input-shape", "1,28,28"], "MatMulNBits"),
        (["--precision", "fp16", "--data", "digits"], "Conv"),
    ],
)
def test_export_modes_write_the_graph_and_report_parity(slim, tmp_path, capsys, args, op):
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", slim, "--out", out, "--json", *args)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["bytes"] == out.stat().st_size and report["path"] == str(out)
    assert op in report["op_types"]
    assert set(report["parity"]) == {"max_abs_error", "top1_agreement", "cosine", "samples"}


def test_table_output_names_parity_and_notes(slim, tmp_path, capsys):
    code, stdout, err = run(capsys, "export", slim, "--out", tmp_path / "m.onnx", "--quant", "int4-weight",
                            "--data", "digits")  # fmt: skip
    assert code == 0, err
    assert "parity cosine" in stdout and "MatMulNBits x2" in stdout
    assert "note: 2 Conv node(s) stay fp32" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "int8-static", "--data", "digits"], "--quant int8-static needs --calib"),
        (["--quant", "int2"], "quant = 'int2' is invalid"),
        (["--format", "tflite", "--data", "digits"], "--format = 'tflite' is invalid"),
        ([], "--data, --calib or --input-shape is missing"),
    ],
)
def test_user_errors_exit_2_with_one_line(slim, tmp_path, capsys, args, message):
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", slim, "--out", out, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_existing_output_needs_force(slim, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    code, _, err = run(capsys, "export", slim, "--out", out, "--input-shape", "1,28,28")
    assert code == 2 and "--force" in err
    assert out.read_bytes() == b"keep"

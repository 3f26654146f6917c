"""``torchslim quantize`` end to end on a trained model: smaller file, measured accuracy, plots."""

import json
import os

import pytest

from torchslim.cli.main import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("qcli") / "lenet300.slim"
    assert main(["train", "--model", "lenet300", "--epochs", "3", "--out", str(path), "--no-progress"]) == 0
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_int4_group_quantization_shrinks_the_file_and_keeps_accuracy(trained, tmp_path, capsys):
    out = tmp_path / "q4.slim"
    code, stdout, err = run(
        capsys,
        "quantize",
        trained,
        "--bits",
        "4",
        "--granularity",
        "group",
        "--group-size",
        "32",
        "--data",
        "digits",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["output_bytes"] == os.path.getsize(out)
    assert report["compression_ratio"] > 6
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.02
    from torchslim.artifact import read_manifest

    stages = read_manifest(out)["recipe"]
    assert [s["stage"] for s in stages] == ["train", "quantize"]
    assert stages[1]["config"]["bits"] == 4 and stages[1]["config"]["group_size"] == 32


@pytest.mark.parametrize(("mode", "ratio"), [("fp16", 1.9), ("bf16", 1.9), ("codebook", 6.5)])
def test_other_modes(trained, tmp_path, capsys, mode, ratio):
    out = tmp_path / f"{mode}.slim"
    code, stdout, err = run(capsys, "quantize", trained, "--mode", mode, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["compression_ratio"] > ratio


def test_overrides_skip_and_widen_layers(trained, tmp_path, capsys):
    out = tmp_path / "mixed.slim"
    code, stdout, err = run(
        capsys, "quantize", trained, "--bits", "2", "--override", "1=8", "--override", "5=none", "--out", out
    )
    assert code == 0, err
    assert "skipped 5: override is None" in stdout
    import torchslim as ts

    model = ts.load(out)
    assert model[1].bits == 8 and model[3].bits == 2
    assert type(model[5]).__name__ == "Linear"


def test_sweep_prints_each_width_and_writes_a_plot(trained, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, stdout, err = run(
        capsys, "quantize", trained, "--sweep", "2,4,8", "--data", "digits", "--plot", plot, "--json"
    )
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert [r["label"] for r in rows] == ["fp32", "2-bit", "4-bit", "8-bit"]
    sizes = [r["file_bytes"] for r in rows]
    assert sizes[1] < sizes[2] < sizes[3] < sizes[0]
    assert rows[3]["accuracy"] >= rows[0]["accuracy"] - 0.01
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--bits", "9"], "IntQuant.bits = 9"),
        (["--mode", "int3"], "--mode = 'int3' is invalid"),
        (["--override", "1=x"], "--override = '1=x' is invalid"),
        (["--override", "nope=4"], "overrides names layer 'nope'"),
        (["--granularity", "row"], "IntQuant.granularity = 'row'"),
        (["--qat"], "--qat needs --data"),
        (["--sweep", "2,4"], "--sweep needs --data"),
        # options a mode cannot use were ignored (QAT of codebook trained IntQuant instead): now refused
        (["--mode", "codebook", "--qat", "--data", "digits"], "--qat is invalid with --mode codebook: expected a "
                                                              "mode that trains (int)"),
        (["--mode", "fp16", "--bits", "4"], "--bits is invalid with --mode fp16: expected only options of "
                                            "HalfPrecision (none)"),
        (["--mode", "bf16", "--override", "1=8"], "--override = '1=8' is invalid with HalfPrecision, which has no "
                                                  "bits"),
        (["--mode", "int8-dynamic", "--override", "1=none"], "--override = '1=none' is invalid with --mode "
                                                             "int8-dynamic"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(trained, tmp_path, capsys, args, expected):
    out = tmp_path / "bad.slim"
    code, _, err = run(capsys, "quantize", trained, *args, "--out", out)
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_never_overwrites_the_input_without_force(trained, capsys):
    before = trained.read_bytes()
    code, _, err = run(capsys, "quantize", trained, "--out", trained)
    assert code == 2 and "also an input" in err
    assert trained.read_bytes() == before


def test_qat_trains_and_saves_a_packed_model(trained, tmp_path, capsys):
    out = tmp_path / "qat.slim"
    code, stdout, err = run(
        capsys, "quantize", trained, "--qat", "--bits", "3", "--epochs", "1", "--data", "digits", "--out", out, "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.03
    import torchslim as ts

    model = ts.load(out)
    assert type(model[1]).__name__ == "IntQuantLayer" and model[1].bits == 3
    assert ts.read_manifest(out)["recipe"][-1]["teacher"] == "the input model"  # distils by default


@pytest.mark.parametrize("kd", [True, False])
def test_qat_distils_from_the_input_model_unless_told_not_to(trained, tmp_path, capsys, monkeypatch, kd):
    import torchslim.distill.api as distill_api

    seen = []
    real = distill_api.kd_loss_fn
    monkeypatch.setattr(distill_api, "kd_loss_fn", lambda teacher, kd: seen.append(teacher) or real(teacher, kd))
    code, _, err = run(capsys, "quantize", trained, "--qat", "--epochs", "1", "--data", "digits",
                       "--out", tmp_path / "q.slim", *([] if kd else ["--no-kd"]))
    assert code == 0, err
    assert bool(seen) == kd
    if kd:  # the frozen fp32 input model, not the model being trained
        assert all(type(m).__name__ != "QATLayer" for m in seen[0].modules()) and not seen[0].training


def test_int8_static_runs_in_onnxruntime(trained, tmp_path, capsys):
    out = tmp_path / "int8.slim"
    code, stdout, err = run(
        capsys,
        "quantize",
        trained,
        "--mode",
        "int8-static",
        "--calib",
        "digits",
        "--data",
        "digits",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["compression_ratio"] > 3.5
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.01
    import torchslim as ts

    assert ts.load(out).runtime == "onnxruntime"

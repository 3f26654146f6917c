"""``torchslim fuse``: fine-tuned copies of one model fused into one file, with accuracies and a recipe."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import torchslim as ts
from torchslim.cli.main import main
from torchslim.train import TrainConfig, train


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, digits):
    """student_mlp trained once, then three 1-epoch fine-tunes with different seeds, saved as .slim files."""
    folder = tmp_path_factory.mktemp("fuse")
    torch.manual_seed(0)
    base = ts.create_model("student_mlp")
    train(base, digits.train, TrainConfig(epochs=8, lr=3e-3, augment_shift=2), progress=False)
    paths = []
    for seed in (1, 2, 3):
        model = copy.deepcopy(base)
        train(model, digits.train, TrainConfig(epochs=1, lr=1e-3, seed=seed, augment_shift=2), progress=False)
        path = folder / f"t{seed}.slim"
        ts.save(model, path, recipe=[{"stage": "train", "seed": seed}])
        paths.append(path)
    return paths


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fuse_writes_the_fused_weights_and_reports_accuracy(teachers, tmp_path, capsys):
    out = tmp_path / "fused.slim"
    code, stdout, err = run(capsys, "fuse", *teachers, "--alpha", "-1", "--data", "digits", "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["converged"] and report["residual"] <= 1e-6 and report["iterations"] >= 1
    assert len(report["teacher_accuracy"]) == 3 and sum(report["teacher_weights"]) == pytest.approx(1.0)
    assert report["accuracy"] >= min(report["teacher_accuracy"])
    fused = ts.load(out)
    expected = ts.fuse_parameters([ts.load(p) for p in teachers], alpha=-1.0).state_dict
    for key, value in fused.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert ts.evaluate(fused, ts.load_data("digits").test) == pytest.approx(report["accuracy"])
    manifest = ts.read_manifest(out)
    stage = manifest["recipe"][0]
    assert stage["stage"] == "fuse" and stage["config"]["alpha"] == -1.0 and stage["config"]["distance"] == "abs"
    assert [s["path"] for s in stage["sources"]] == [str(p) for p in teachers]
    assert stage["sources"][1]["recipe"] == [{"stage": "train", "seed": 2}]
    assert manifest["measurements"]["teacher_accuracy"] == report["teacher_accuracy"]


def test_alpha_zero_averages_and_the_text_report_names_iterations(teachers, tmp_path, capsys):
    out = tmp_path / "mean.slim"
    code, stdout, err = run(capsys, "fuse", teachers[0], teachers[1], "--alpha", "0", "--distance", "squared",
                            "--out", out)  # fmt: skip
    assert code == 0, err
    assert "1 iteration(s), residual 0: converged" in stdout and "0.500" in stdout
    a, b = ts.load(teachers[0]).state_dict(), ts.load(teachers[1]).state_dict()
    for key, value in ts.load(out).state_dict().items():
        assert torch.allclose(value, ((a[key].double() + b[key].double()) / 2).float()), key


def test_not_converging_is_reported_not_hidden(teachers, tmp_path, capsys):
    code, stdout, _ = run(capsys, "fuse", *teachers, "--alpha", "-300", "--max-iter", "1", "--out", tmp_path / "x.slim")
    assert code == 0
    assert "did NOT converge" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "nan"], "ParameterFusion.alpha = nan is invalid"),
        (["--distance", "cosine"], "ParameterFusion.distance = 'cosine' is invalid: expected one of 'abs', 'squared'"),
        (["--max-iter", "0"], "ParameterFusion.max_iter = 0 is invalid: expected an integer >= 1"),
        (["--tol", "-1"], "ParameterFusion.tol = -1.0 is invalid"),
    ],
)
def test_bad_options_fail_before_writing(teachers, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.slim"
    code, _, err = run(capsys, "fuse", *teachers, *extra, "--out", out)
    assert code == 2 and message in err
    assert not out.exists()


def test_bad_inputs_name_the_problem(teachers, tmp_path, capsys):
    out = tmp_path / "bad.slim"
    code, _, err = run(capsys, "fuse", teachers[0], "--out", out)
    assert code == 2 and "expected at least 2 .slim files" in err
    other = tmp_path / "other.slim"
    ts.save(ts.create_model("student_mlp", hidden=16), other)
    code, _, err = run(capsys, "fuse", teachers[0], other, "--out", out)
    assert code == 2 and "expected teachers of the same model" in err and "'hidden': 16" in err
    quantized = ts.load(teachers[1])
    ts.quantize_(quantized, ts.IntQuant(bits=4))
    ts.save(quantized, tmp_path / "q.slim")
    code, _, err = run(capsys, "fuse", teachers[0], tmp_path / "q.slim", "--out", out)
    assert code == 2 and "quantized/packed layer: fusion works on float models" in err
    assert not out.exists()
    code, _, err = run(capsys, "fuse", teachers[0], teachers[1])
    assert code == 2 and "--out is missing" in err
    out.write_bytes(b"keep")
    code, _, err = run(capsys, "fuse", teachers[0], teachers[1], "--out", out)
    assert code == 2 and "already exists: pass --force" in err and out.read_bytes() == b"keep"

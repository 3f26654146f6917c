"""``torchslim distill``: student saved with the KD recipe; errors before any work."""

import json

import torch

import torchslim as ts
from torchslim.cli.main import main
from torchslim.train import TrainConfig


def _teacher_file(tmp_path, digits):
    torch.manual_seed(0)
    teacher = ts.create_model("student_cnn", width=4)
    ts.train(teacher, torch.utils.data.Subset(digits.train, range(400)), TrainConfig(epochs=2, lr=3e-3),
             progress=False)
    path = tmp_path / "teacher.slim"
    ts.save(teacher, path)
    return path


def test_distill_saves_student_with_kd_recipe(tmp_path, digits, capsys):
    teacher = _teacher_file(tmp_path, digits)
    out = tmp_path / "student.slim"
    code = main(["distill", "--teacher", str(teacher), "--student", "student_mlp", "--epochs", "2",
                 "--temperature", "3", "--alpha", "0.8", "--cache-logits", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["student_accuracy"] > 0.5 and summary["teacher_accuracy"] > 0.5
    manifest = ts.read_manifest(out)
    stage = manifest["recipe"][-1]
    assert stage["stage"] == "distill" and stage["config"]["temperature"] == 3 and stage["config"]["alpha"] == 0.8
    assert stage["train"]["augment_shift"] == 0  # cached logits: no shifts
    assert manifest["measurements"]["accuracy"] == summary["student_accuracy"]
    assert ts.evaluate(ts.load(out), digits.test) == summary["student_accuracy"]
    # the table output names teacher and student accuracy; an existing output needs --force
    code = main(["distill", "--teacher", str(teacher), "--student", str(out), "--epochs", "1", "--out", str(out),
                 "--force"])
    text = capsys.readouterr().out
    assert code == 0 and "teacher" in text and "student distilled" in text
    assert [s["stage"] for s in ts.read_manifest(out)["recipe"]] == ["distill", "distill"]


def test_distill_errors_are_one_line_before_work(tmp_path, digits, capsys):
    teacher = _teacher_file(tmp_path, digits)
    out = tmp_path / "s.slim"
    out.write_bytes(b"keep")
    assert main(["distill", "--teacher", str(teacher), "--student", "student_mlp", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    other = tmp_path / "t.slim"
    cases = [
        (["--alpha", "1.5"], "KD.alpha = 1.5 is invalid: expected a number in [0, 1]"),
        (["--temperature", "0"], "KD.temperature = 0.0 is invalid"),
        (["--synthetic", "gan"], "SyntheticData.method = 'gan' is invalid"),
        (["--synthetic", "bn-inversion", "--synthetic-preset", "slow"],
         "--synthetic-preset = 'slow' is invalid: expected one of quick, thorough"),
        (["--features", "stem"], "'stem' is invalid: expected 'teacher.module.name:student.module.name'"),
        (["--features", "9:1"], "teacher has no module named '9'"),
    ]
    for extra, words in cases:
        code = main(["distill", "--teacher", str(teacher), "--student", "student_mlp", "--out", str(other), *extra])
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.startswith("error: "), (extra, err)
        assert not other.exists()


def test_synthetic_defaults_are_the_quick_preset(tmp_path, digits, capsys):
    teacher = _teacher_file(tmp_path, digits)
    out = tmp_path / "s.slim"
    args = ["distill", "--teacher", str(teacher), "--student", "student_mlp", "--synthetic", "noise", "--epochs", "1"]
    assert main(args + ["--out", str(out), "--json"]) == 0
    stage = ts.read_manifest(out)["recipe"][-1]
    assert {k: stage["synthetic"][k] for k in ("n", "steps", "downsample", "shift_views")} == {
        "n": 512, "steps": 100, "downsample": 2, "shift_views": 2}
    assert stage["train"]["augment_shift"] == 0  # the set holds every shifted view; the loop does not shift
    assert main(args + ["--synthetic-preset", "thorough", "--synthetic-n", "64", "--out", str(out), "--force"]) == 0
    stage = ts.read_manifest(out)["recipe"][-1]
    assert {k: stage["synthetic"][k] for k in ("n", "steps", "downsample", "shift_views")} == {
        "n": 64, "steps": 200, "downsample": 1, "shift_views": 0}
    assert stage["train"]["augment_shift"] == 2  # the live teacher labels the loop's shifted batches
    assert "distill: epoch 1/1" in capsys.readouterr().err  # progress lines on stderr (not a terminal)

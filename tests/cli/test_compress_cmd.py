"""torchslim compress / torchslim report as a user runs them: exit codes, one-line errors, files written."""

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli.main import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def model_file(digits, tmp_path_factory):
    """lenet300 trained for 2 epochs, saved as a .slim."""
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    ts.train(model, digits.train, ts.TrainConfig(epochs=2), progress=False)
    path = tmp_path_factory.mktemp("cmd") / "lenet300.slim"
    ts.save(model.eval(), path)
    return path


def test_invalid_recipe_fails_before_any_work(capsys, model_file, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nstages:\n  - prune: {method: channel, amount: 0.5}\n  - quantize: {bits: 12}\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", "--model", model_file, "--recipe", recipe, "--out", out)
    assert code == 2
    assert err.startswith("error: ") and "stage 2 (quantize): IntQuant.bits = 12 is invalid" in err
    assert not out.exists()  # nothing was written


def test_recipe_or_budget_is_required(capsys, model_file, tmp_path):
    code, _, err = run(capsys, "compress", "--model", model_file, "--out", tmp_path / "o")
    assert code == 2 and "exactly one of --recipe" in err
    code, _, err = run(capsys, "compress", "--model", model_file, "--out", tmp_path / "o",
                       "--max-accuracy-drop", "0.5", "--time-budget", "soon")
    assert code == 2 and "--time-budget = 'soon' is invalid" in err


def test_compress_recipe_writes_stages_report_and_json(capsys, model_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: q\nstages:\n  - quantize: {method: int, bits: 4}\n")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", "--model", model_file, "--recipe", recipe, "--out", out,
                            "--no-latency", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["stages"][0]["measurement"]["artifact_bytes"] < result["input"]["measurement"]["artifact_bytes"] / 6
    assert (out / "model.slim").is_file() and (out / "report.html").is_file()
    (out / "report.md").unlink()
    code, stdout, err = run(capsys, "report", out)
    assert code == 0, err
    assert (out / "report.md").is_file()
    assert "| 1-quantize |" in (out / "report.md").read_text()


def test_report_of_a_directory_without_measurements(capsys, tmp_path):
    code, _, err = run(capsys, "report", tmp_path)
    assert code == 2 and "holds no report.json or compress.json" in err


def test_planner_warns_when_the_model_has_seen_the_held_out_images(capsys, digits, model_file, tmp_path):
    from torchslim.pipeline.planner import PlannerConfig, holdout_split, holdout_warning

    _, held = holdout_split(digits.train)
    torch.manual_seed(0)
    seen = ts.create_model("lenet300")
    ts.train(seen, held, ts.TrainConfig(epochs=15), progress=False)  # memorises the planner's held-out images
    path = tmp_path / "seen.slim"
    ts.save(seen.eval(), path)
    code, _, err = run(capsys, "compress", "--model", path, "--out", tmp_path / "o", "--max-accuracy-drop", "0.5",
                       "--time-budget", "0.001", "--no-latency")
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "scores 100% on the planner's held-out part (287 training images" in warnings[0]
    assert code == 2 and "no candidate" in err  # no time to search: the report of what ran is still written
    assert (tmp_path / "o" / "report.md").is_file()
    assert holdout_warning(ts.load(model_file), digits, PlannerConfig()) is None  # 2 epochs: not 100% there


def test_teacher_is_for_the_planner_and_must_exist(capsys, model_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: q\nstages:\n  - quantize: {method: int, bits: 4}\n")
    code, _, err = run(capsys, "compress", "--model", model_file, "--recipe", recipe, "--out", tmp_path / "o",
                       "--teacher", model_file)
    assert code == 2 and "--teacher is for the planner (--max-accuracy-drop)" in err
    code, _, err = run(capsys, "compress", "--model", model_file, "--out", tmp_path / "o", "--max-accuracy-drop",
                       "0.5", "--teacher", tmp_path / "missing.slim")
    assert code == 2 and "--teacher = " in err and "missing.slim' is invalid: expected an existing .slim file" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "compress", "--model", model_file, "--out", tmp_path / "p", "--max-accuracy-drop",
                       "0.5", "--teacher", model_file, "--time-budget", "0.001", "--no-latency")
    assert code == 2 and "no candidate" in err
    assert f"Distillation teacher: {model_file}." in (tmp_path / "p" / "report.md").read_text()

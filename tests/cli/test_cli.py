"""The command line as a user runs it: exit codes, one-line errors, JSON output, real files."""

import json
import os
import subprocess
import sys

import pytest

from torchslim.cli.main import main


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quickly trained lenet300 (2 epochs) saved by the CLI itself."""
    path = tmp_path_factory.mktemp("cli") / "lenet300.slim"
    code = main(
        [
            "train",
            "--model",
            "lenet300",
            "--data",
            "digits",
            "--epochs",
            "2",
            "--out",
            str(path),
            "--no-progress",
            "--json",
        ]
    )
    assert code == 0
    return path


def test_help_on_every_command(capsys):
    for command in ([], ["demo"], ["train"], ["eval"], ["inspect"], ["models"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0
        assert "Usage" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("torchslim 0.")


def test_train_writes_a_slim_file_with_its_recipe(trained, capsys):
    from torchslim.artifact import read_manifest

    manifest = read_manifest(trained)
    assert manifest["factory"]["name"] == "torchslim.models:lenet300"
    assert manifest["recipe"][0]["stage"] == "train"
    assert manifest["recipe"][0]["config"]["epochs"] == 2
    assert manifest["measurements"]["accuracy"] > 0.8


def test_eval_json_reports_what_users_need(trained, capsys):
    code, out, err = run(capsys, "eval", str(trained), "--data", "digits", "--json", "--batch-sizes", "1,4")
    assert code == 0, err
    report = json.loads(out)
    assert report["accuracy"] > 0.8
    assert report["artifact_bytes"] == os.path.getsize(trained)
    assert report["parameters"] == 266_610
    assert report["macs"] == 266_200
    assert set(report["latency"]) == {"1", "4"}
    assert report["latency"]["1"]["median_ms"] > 0


def test_inspect_json_lists_every_tensor(trained, capsys):
    code, out, _ = run(capsys, "inspect", str(trained), "--json")
    assert code == 0
    report = json.loads(out)
    names = {row["name"] for row in report["tensors"]}
    assert names == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert report["bytes"] == os.path.getsize(trained)
    code, out, _ = run(capsys, "inspect", str(trained))
    assert code == 0 and "1.weight" in out and "300x784" in out


def test_models_lists_reference_models(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    assert {"lenet300", "lenet5", "resnet"} <= set(json.loads(out))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--model", "lenet6", "--epochs", "1"], "'lenet6' is not registered"),
        (["train", "--epochs", "0"], "TrainConfig.epochs = 0"),
        (["train", "--lr", "-1"], "TrainConfig.lr = -1.0"),
        (["train", "--data", "npz:/nonexistent/x.npz", "--epochs", "1"], "npz:/nonexistent/x.npz"),
        (["train", "--data", "bogus:thing", "--epochs", "1"], "bogus:thing"),
        (["eval", "/nonexistent/model.slim"], "/nonexistent/model.slim"),
        (["inspect", "/nonexistent/model.slim"], "/nonexistent/model.slim"),
        (["eval", "{trained}", "--batch-sizes", "1,x"], "--batch-sizes = '1,x' is invalid"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, trained, args, expected):
    out_file = tmp_path / "out.slim"
    args = [a.replace("{trained}", str(trained)) for a in args]
    if args[0] == "train":
        args += ["--out", str(out_file), "--no-progress"]
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("error: ")
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not out_file.exists()


def test_existing_output_needs_force(trained, tmp_path, capsys):
    before = trained.read_bytes()
    code, _, err = run(capsys, "train", "--model", "lenet300", "--epochs", "1", "--out", str(trained), "--no-progress")
    assert code == 2 and "already exists: pass --force" in err
    assert trained.read_bytes() == before


def test_corrupted_file_is_a_one_line_error(tmp_path, capsys, trained):
    broken = tmp_path / "broken.slim"
    broken.write_bytes(trained.read_bytes()[:1000])
    code, _, err = run(capsys, "eval", str(broken))
    assert code == 2 and str(broken) in err and len(err.strip().splitlines()) == 1


def test_verbose_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--verbose", "train", "--epochs", "0")
    assert code == 2 and "Traceback" in err and "error: " in err


def test_console_script_is_installed_and_exits_2():
    exe = os.path.join(os.path.dirname(sys.executable), "torchslim")
    result = subprocess.run([exe, "inspect", "/nonexistent.slim"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")

"""Progress reporting: silent library by default, one line per epoch/batch off a terminal, bars on one, no effect
on results; the CLI reports unless --quiet."""

import io
import re

import pytest
import torch
from torch import nn

from torchslim import progress
from torchslim.cli.main import main
from torchslim.distill import SyntheticData, synthesize
from torchslim.errors import ConfigError
from torchslim.testing import blobs
from torchslim.train import TrainConfig, train


class Terminal(io.StringIO):
    """A stream that says it is an interactive terminal."""

    def isatty(self) -> bool:
        return True


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def test_modes_resolve(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert progress.resolve(None) == "off"  # the library is silent unless asked
    assert progress.resolve(False) == "off"
    assert progress.resolve(True) == "lines"  # pytest's stderr is not a terminal
    with progress.reporting("auto", stream=Terminal()):
        assert progress.resolve(None) == "bar"
        assert progress.resolve(False) == "off"
        monkeypatch.setenv("CI", "1")
        assert progress.resolve(None) == "lines"  # CI logs get lines, not bars
    with progress.reporting("off"):
        assert progress.resolve(None) == "off" and progress.resolve(True) == "lines"
    assert progress.current_mode() == "off"  # restored after the block
    with pytest.raises(ConfigError, match=r"progress mode = 'loud' is invalid: expected one of auto, bar, lines, off"):
        progress.configure("loud")


def test_train_prints_one_line_per_epoch_and_the_same_weights(capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # CI runners set $CI, which turns "auto" bars into lines
    data = blobs(n=96, features=16)
    silent = mlp()
    train(silent, data, TrainConfig(epochs=3, batch_size=32), eval_data=data)
    assert capsys.readouterr().err == ""

    reported = mlp()
    train(reported, data, TrainConfig(epochs=3, batch_size=32), eval_data=data, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    pattern = r"train: epoch 1/3: loss \d\.\d{4}, train acc [\d.]+%, eval acc [\d.]+% \(<?\d+ s; ETA <?\d+ s\)"
    assert re.fullmatch(pattern, lines[0])
    assert lines[2].startswith("train: epoch 3/3: ") and "ETA" not in lines[2]

    barred = mlp()
    screen = Terminal()
    with progress.reporting("auto", stream=screen):
        train(barred, data, TrainConfig(epochs=3, batch_size=32), eval_data=data)
    assert "ETA" in screen.getvalue() and "train epoch 3/3" in screen.getvalue()
    assert "train: epoch 3/3: loss" in screen.getvalue()  # the last epoch's line stays above the bar
    for a, b in ((silent, reported), (silent, barred)):  # reporting does not touch the RNG or the math
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bn_inversion_one_line_per_batch_and_the_same_samples(capsys):
    config = SyntheticData(n=6, steps=3, batch_size=4)
    quiet = synthesize(bn_net(), config, input_shape=(1, 8, 8)).tensors[0]
    assert capsys.readouterr().err == ""
    with progress.reporting("lines"):
        with progress.label("distill"):  # synthesis keeps its own name
            loud = synthesize(bn_net(), config, input_shape=(1, 8, 8)).tensors[0]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": loss")[0] for line in lines] == ["bn-inversion: batch 1/2 (4 images, 3 steps)",
                                                          "bn-inversion: batch 2/2 (2 images, 3 steps)"]
    assert "ETA" in lines[0]
    assert torch.equal(quiet, loud)


def test_task_eta_ignores_units_done_before_a_resume():
    task = progress.Task("t", total=10, mode="lines", done=5)
    assert task.eta() is None  # nothing done in this run yet
    task.started -= 2.0
    task.advance(1)
    assert task.eta() == pytest.approx(8.0, rel=0.05)  # 1 unit in ~2 s, 4 left


def test_cli_reports_on_stderr_and_quiet_turns_it_off(capsys, tmp_path):
    args = ["train", "--model", "student_mlp", "--epochs", "2", "--json"]
    assert main(args + ["--out", str(tmp_path / "a.slim")]) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[:2] for line in captured.err.splitlines()] == [["train", " epoch 1/2"],
                                                                          ["train", " epoch 2/2"]]
    assert captured.out.startswith("{")  # stdout keeps only the result
    for quiet in (["--quiet"], ["-q"]):  # anywhere on the line
        assert main(quiet + args + ["--out", str(tmp_path / f"b{quiet[0]}.slim")]) == 0
        assert capsys.readouterr().err == ""
    assert main(args + ["--out", str(tmp_path / "c.slim"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert progress.current_mode() == "off"  # the CLI's setting ends with the command


def test_labels_name_distill_and_qat_epochs(capsys):
    from torchslim.distill import KD, distill
    from torchslim.quantize import IntQuant
    from torchslim.quantize.qat import qat

    data = blobs(n=64, features=16)
    teacher = mlp().eval()
    with progress.reporting("lines"):
        distill(mlp(), teacher, data, KD(), train_config=TrainConfig(epochs=1))
        qat(mlp(), data, IntQuant(bits=4), TrainConfig(epochs=1))
    assert [line.split(":")[0] for line in capsys.readouterr().err.splitlines()] == ["distill", "qat"]


def test_say_writes_unless_off(capsys):
    progress.say("not shown")
    with progress.reporting("lines"):
        progress.say("stage done")
    assert capsys.readouterr().err == "stage done\n"

"""``torchslim prune`` end to end: each flag family on a trained lenet5, and one-line errors that write nothing."""

import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.artifact import read_manifest
from torchslim.cli.main import main
from torchslim.prune.schedule import polynomial_sparsity
from torchslim.prune.unstructured import is_nm_pattern

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcli") / "lenet5.slim"
    assert main(["train", "--model", "lenet5", "--out", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def dense_weights(trained):
    model = ts.load(trained)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune_json(capsys, trained, out, *args):
    code, stdout, err = run(capsys, "prune", trained, *args, "--out", out, "--json", "--no-progress")
    assert code == 0, err
    return json.loads(stdout)


def layers_of(path):
    model = ts.load(path)
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_global_threshold_writes_a_finalized_sparse_model(trained, dense_weights, tmp_path, capsys):
    out = tmp_path / "tau.slim"
    report = prune_json(capsys, trained, out, "--scope", "global", "--threshold", "0.05")
    total = sum(w.numel() for w in dense_weights.values())
    assert report["sparsity"] == sum(int((w.abs() <= 0.05).sum()) for w in dense_weights.values()) / total
    assert report["threshold"] == 0.05 and report["method"] == "magnitude"
    assert report["output_bytes"] == out.stat().st_size < 0.2 * report["input_bytes"]
    assert report["compression_ratio"] == pytest.approx(report["input_bytes"] / report["output_bytes"])
    assert report["accuracy_before"] is None and report["accuracy_after"] is None
    for name, module in layers_of(out).items():
        w = dense_weights[name]
        assert torch.equal(module.weight.detach(), torch.where(w.abs() > 0.05, w, torch.zeros_like(w))), name
        assert report["layers"][name]["sparsity"] == pytest.approx(float((w.abs() <= 0.05).float().mean()))
    stages = read_manifest(out)["recipe"]
    assert [s["stage"] for s in stages] == ["train", "prune"]
    assert stages[1]["config"] == {"type": "magnitude", "scope": "global", "threshold": 0.05, "amount": None,
                                   "std_multiplier": None, "criterion": "l1"}
    assert stages[1]["finetune"] is None


def test_amount_with_fine_tuning_keeps_accuracy_and_prints_a_table(trained, tmp_path, capsys):
    out = tmp_path / "ft.slim"
    code, stdout, err = run(capsys, "prune", trained, "--amount", "0.9", "--finetune-epochs", "3", "--data", "digits",
                            "--out", out, "--no-progress")
    assert code == 0, err
    for text in ("sparsity per layer", "file bytes", "accuracy", "90.00%"):
        assert text in stdout
    model = ts.load(out)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)
    manifest = read_manifest(out)
    stage = manifest["recipe"][-1]
    assert stage["finetune"]["epochs"] == 3 and stage["schedule"]["finetune_epochs"] == 3 and stage["data"] == "digits"
    before = manifest["recipe"][0]
    assert before["stage"] == "train"
    data = ts.load_data("digits")
    accuracy = ts.measure.accuracy(model, data.test)
    assert manifest["measurements"]["accuracy"] == accuracy
    assert accuracy >= ts.measure.accuracy(ts.load(trained), data.test) - 0.015


def test_neuron_scope_amount_and_std_multiplier(trained, dense_weights, tmp_path, capsys):
    out = tmp_path / "neuron.slim"
    prune_json(capsys, trained, out, "--scope", "neuron", "--amount", "0.8")
    for name, module in layers_of(out).items():
        rows = module.weight.reshape(module.weight.shape[0], -1)
        assert torch.all((rows == 0).sum(dim=1) == round(0.8 * rows.shape[1])), name
    out = tmp_path / "std.slim"
    report = prune_json(capsys, trained, out, "--scope", "neuron", "--std-multiplier", "1.5")
    for name, module in layers_of(out).items():
        w = dense_weights[name].reshape(dense_weights[name].shape[0], -1)
        keep = w.abs() > 1.5 * w.std(dim=1, unbiased=False, keepdim=True)
        assert torch.equal(module.weight.reshape(w.shape) != 0, keep), name
    assert report["config"]["std_multiplier"] == 1.5


def test_taylor_criterion_uses_the_data(trained, tmp_path, capsys):
    report = prune_json(capsys, trained, tmp_path / "taylor.slim", "--amount", "0.5", "--criterion", "taylor",
                        "--data", "digits")
    magnitude = prune_json(capsys, trained, tmp_path / "l1.slim", "--amount", "0.5")
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-5) and report["config"]["criterion"] == "taylor"
    taylor_zeros = layers_of(tmp_path / "taylor.slim")["5"].weight == 0
    l1_zeros = layers_of(tmp_path / "l1.slim")["5"].weight == 0
    assert not torch.equal(taylor_zeros, l1_zeros)
    assert magnitude["accuracy_after"] is None and report["accuracy_after"] is not None


def test_nm_2_4(trained, tmp_path, capsys):
    out = tmp_path / "nm.slim"
    report = prune_json(capsys, trained, out, "--nm", "2:4")
    assert report["method"] == "nm" and set(report["skipped"]) == {"0"}
    layers = layers_of(out)
    for name in ("2", "5", "7"):
        assert is_nm_pattern(layers[name].weight, 2, 4), name
        assert report["layers"][name]["sparsity"] == pytest.approx(0.5)
    assert int((layers["0"].weight == 0).sum()) == 0


@pytest.mark.parametrize(("kind", "args"), [("gradual", ["--amount", "0.9"]), ("iterative", ["--threshold", "0.03"])])
def test_schedules(trained, tmp_path, capsys, kind, args):
    out = tmp_path / f"{kind}.slim"
    report = prune_json(capsys, trained, out, *args, "--schedule", kind, "--steps", "3", "--finetune-epochs", "1",
                        "--data", "digits")
    history = report["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and [h["epochs"] for h in history] == [1, 1, 1]
    if kind == "gradual":
        assert [h["target_sparsity"] for h in history] == pytest.approx(polynomial_sparsity(0.9, 3))
        assert report["sparsity"] == pytest.approx(0.9, abs=1e-6)
    else:
        assert [h["threshold"] for h in history] == [0.03] * 3
        achieved = [h["achieved_sparsity"] for h in history]
        assert achieved == sorted(achieved) and achieved[-1] > achieved[0]
    stage = read_manifest(out)["recipe"][-1]
    assert stage["schedule"]["kind"] == kind and stage["schedule"]["steps"] == 3
    assert report["accuracy_after"] > 0.9


def test_structured_removes_channels_rounded_to_8(trained, tmp_path, capsys):
    out = tmp_path / "channels.slim"
    report = prune_json(capsys, trained, out, "--structured", "--amount", "0.5", "--round-to", "8",
                        "--finetune-epochs", "3", "--data", "digits")
    assert report["method"] == "channel"
    assert report["parameters_after"] <= 0.55 * report["parameters_before"]
    assert report["macs_ratio"] <= 0.55
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.03  # a short fine-tune; wiring, not the budget
    assert len(report["history"]) == 3
    model = ts.load(out)
    assert model[0].out_channels % 8 == 0 and model[2].out_channels % 8 == 0 and model[5].out_features % 8 == 0
    assert model[0].out_channels < 20 and model[7].out_features == 10
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    stage = read_manifest(out)["recipe"][-1]
    assert stage["config"]["type"] == "channel" and stage["config"]["round_to"] == 8
    code, stdout, err = run(capsys, "prune", trained, "--structured", "--amount", "0.5", "--out", tmp_path / "t.slim")
    assert code == 0, err
    assert "changed layers" in stdout and "MACs" in stdout


def test_sweep_threshold_prints_rows_and_writes_a_plot(trained, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, stdout, err = run(capsys, "prune", trained, "--sweep-threshold", "0.01,0.02,0.05,0.1", "--data", "digits",
                            "--plot", plot, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["fp32", "tau=0.01", "tau=0.02", "tau=0.05", "tau=0.1"]
    sparsity = [r["sparsity"] for r in rows]
    assert sparsity == sorted(sparsity) and len(set(sparsity)) == 5
    assert set(rows[1]["layers"]) == {"0", "2", "5", "7"}
    assert plot.read_bytes()[:8] == PNG and result["plot"] == str(plot)
    code, stdout, err = run(capsys, "prune", trained, "--sweep-threshold", "0.02,0.05", "--data", "digits",
                            "--plot", tmp_path / "text.png")
    assert code == 0, err
    assert "threshold sweep" in stdout and "sparsity per layer" in stdout and "tau=0.05" in stdout


def test_trust_factory_is_needed_for_a_user_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "prune_cli_user_nets.py").write_text(
        "from torchslim.models.lenet import lenet300\n\ndef net(num_classes=10):\n    return lenet300(num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = ts.save(ts.create_model("prune_cli_user_nets:net"), tmp_path / "user.slim")
    out = tmp_path / "user-pruned.slim"
    code, _, err = run(capsys, "prune", source, "--amount", "0.5", "--out", out)
    assert code == 2 and "--trust-factory" in err and not out.exists()
    code, _, err = run(capsys, "prune", source, "--amount", "0.5", "--out", out, "--trust-factory")
    assert code == 0, err
    weights = [m.weight for m in ts.load(out, trust_factory=True).modules() if isinstance(m, nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "nothing to prune: expected one of --threshold, --amount"),
        (["--amount", "1.5"], "MagnitudePruning.amount = 1.5"),
        (["--threshold", "0.05", "--amount", "0.5"], "exactly one of threshold, amount, std_multiplier"),
        (["--std-multiplier", "1.0"], "MagnitudePruning.std_multiplier = 1.0 is invalid: expected None unless"),
        (["--scope", "row", "--amount", "0.5"], "MagnitudePruning.scope = 'row'"),
        (["--criterion", "l3", "--amount", "0.5"], "MagnitudePruning.criterion = 'l3'"),
        (["--criterion", "taylor", "--amount", "0.5"], "--criterion taylor needs --data"),
        (["--nm", "2-4"], "--nm = '2-4' is invalid: expected N:M"),
        (["--nm", "4:4"], "NMSparsity.n = 4"),
        (["--nm", "2:4", "--amount", "0.5"], "--nm cannot be combined with --amount"),
        (["--amount", "0.5", "--finetune-epochs", "2"], "needs --data"),
        (["--amount", "0.5", "--finetune-epochs", "-1"], "--finetune-epochs = -1"),
        (["--amount", "0.5", "--finetune-epochs", "1", "--data", "digits", "--lr", "-1"], "TrainConfig.lr = -1"),
        (["--amount", "0.5", "--schedule", "cubic"], "--schedule = 'cubic' is invalid"),
        (["--amount", "0.5", "--steps", "3"], "PruneSchedule.steps = 3 is invalid: expected 1 when kind='oneshot'"),
        (["--threshold", "0.05", "--schedule", "gradual", "--data", "digits"],
         "kind = 'gradual' is invalid with MagnitudePruning.threshold"),
        (["--nm", "2:4", "--schedule", "iterative", "--data", "digits"], "N:M pattern is fixed in one step"),
        (["--structured"], "--structured needs --amount"),
        (["--structured", "--threshold", "0.1"], "--structured cannot be combined with --threshold"),
        (["--structured", "--amount", "0.5", "--scope", "neuron"], "--scope = 'neuron' is invalid with --structured"),
        (["--structured", "--amount", "0.5", "--round-to", "0"], "ChannelPruning.round_to = 0"),
        (["--structured", "--amount", "0.5", "--schedule", "gradual", "--epochs-per-step", "0"],
         "--schedule = 'gradual' is invalid with --structured"),
        (["--amount", "0.5", "--round-to", "8"], "--round-to needs --structured"),
        (["--amount", "0.5", "--heads", "0.5"], "--heads needs --structured"),
        (["--structured", "--amount", "0.5", "--heads", "1.5"], "ChannelPruning.heads = 1.5"),
        (["--amount", "0.5", "--data", "nosuchdata"], "nosuchdata"),
    ],
)
def test_bad_options_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys, args, expected):
    out = tmp_path / "bad.slim"
    code, stdout, err = run(capsys, "prune", trained, *args, "--out", out)
    assert code == 2, err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sweep-threshold", "0.01,x", "--data", "digits"], "--sweep-threshold = '0.01,x' is invalid"),
        (["--sweep-threshold", "0.01"], "--sweep-threshold needs --data"),
        (["--sweep-threshold", "0.01,-1", "--data", "digits"], "MagnitudePruning.threshold = -1.0"),
        (["--sweep-threshold", "0.01", "--data", "digits", "--amount", "0.5"], "cannot be combined with --amount"),
        (["--sweep-threshold", "0.01", "--data", "digits", "--out", "x.slim"], "cannot be combined with --out"),
    ],
)
def test_bad_sweeps_exit_2_and_write_no_plot(trained, tmp_path, capsys, args, expected):
    plot = tmp_path / "p.png"
    code, _, err = run(capsys, "prune", trained, *args, "--plot", plot)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_output_paths_and_inputs(trained, tmp_path, capsys):
    before = trained.read_bytes()
    code, _, err = run(capsys, "prune", trained, "--amount", "0.5", "--out", trained)
    assert code == 2 and "also an input" in err and trained.read_bytes() == before
    code, _, err = run(capsys, "prune", trained, "--amount", "0.5")
    assert code == 2 and "--out is missing" in err
    code, _, err = run(capsys, "prune", tmp_path / "missing.slim", "--amount", "0.5", "--out", tmp_path / "o.slim")
    assert code == 2 and "missing.slim" in err and not (tmp_path / "o.slim").exists()
    out = tmp_path / "exists.slim"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "prune", trained, "--amount", "0.5", "--out", out)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep me"
    code, _, err = run(capsys, "prune", trained, "--amount", "0.5", "--out", out, "--force")
    assert code == 0, err
    assert read_manifest(out)["recipe"][-1]["config"]["amount"] == 0.5


def test_a_quantized_model_cannot_be_pruned(trained, tmp_path, capsys):
    quantized = tmp_path / "q.slim"
    code, _, err = run(capsys, "quantize", trained, "--bits", "4", "--out", quantized)
    assert code == 0, err
    out = tmp_path / "qp.slim"
    code, _, err = run(capsys, "prune", quantized, "--amount", "0.5", "--out", out)
    assert code == 2 and "no Linear/Conv layer to prune" in err and not out.exists()

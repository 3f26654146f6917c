"""Tests for torchslim.train: config, learning, determinism, checkpoint/resume, errors and accuracy."""

from __future__ import annotations

import builtins
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from torchslim.config import Config
from torchslim.errors import ConfigError, DataError, ModelError, TorchSlimError
from torchslim.models import create_model
from torchslim.testing import blobs, tiny_images, tiny_mlp
from torchslim.train import (
    RECOMMENDED,
    TrainConfig,
    TrainResult,
    evaluate,
    random_shift,
    recommended_config,
    set_seed,
    train,
)

HERE = Path(__file__).resolve()


# --- helpers -----------------------------------------------------------------------------------------
def split_blobs(n: int = 512, num_classes: int = 4, features: int = 16) -> tuple[Dataset, Dataset]:
    """Train/test splits drawn from the same Gaussian blobs (3/4 train, 1/4 test)."""
    x, y = blobs(n=n, num_classes=num_classes, features=features, seed=0).tensors
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def dropout_mlp(seed: int = 0, features: int = 16, num_classes: int = 4) -> nn.Module:
    """An MLP with dropout, so a run depends on the global RNG (resume must restore it)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(features, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, num_classes)
    )


def tiny_cnn(seed: int = 0) -> nn.Module:
    """student_cnn on 8x8 images with dropout-free conv layers (for augment_shift runs)."""
    torch.manual_seed(seed)
    return create_model("student_cnn", image_size=8, width=4)


def image_data() -> TensorDataset:
    return tiny_images(n=96, num_classes=10, size=8, seed=3)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def same_params(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


class Interrupted(Exception):
    """Raised by a loss function to simulate a crash after a number of steps."""


def crashing_loss(after: int):
    """Cross-entropy that raises on call number ``after + 1`` (so ``after`` steps complete)."""
    calls = [0]

    def loss_fn(model, inputs, targets):
        calls[0] += 1
        if calls[0] > after:
            raise Interrupted(f"simulated crash at call {calls[0]}")
        return F.cross_entropy(model(inputs), targets)

    return loss_fn


class ListDataset(Dataset):
    """A plain map-style dataset (not a TensorDataset): checked batch by batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class Evil:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# --- TrainConfig -------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("epochs", 0),
    ("epochs", 2.5),
    ("epochs", True),
    ("batch_size", 0),
    ("lr", 0.0),
    ("lr", -0.1),
    ("lr", float("nan")),
    ("optimizer", "rmsprop"),
    ("momentum", 1.0),
    ("momentum", -0.5),
    ("weight_decay", -1e-4),
    ("scheduler", "linear"),
    ("step_size", 0),
    ("gamma", 0.0),
    ("gamma", 1.5),
    ("seed", -1),
    ("checkpoint_every", -2),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", -1.0),
    ("augment_shift", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"TrainConfig.{field}" in message
    assert repr(value) in message


def test_config_defaults_and_round_trip():
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.lr, config.optimizer) == (10, 64, 1e-3, "adam")
    assert (config.scheduler, config.checkpoint_every, config.max_grad_norm) == ("none", 0, None)
    custom = TrainConfig(
        epochs=3, optimizer="sgd", lr=0.05, momentum=0.5, scheduler="step", step_size=2, gamma=0.5,
        seed=7, checkpoint_every=5, max_grad_norm=1.0, augment_shift=2,
    )
    data = custom.to_dict()
    assert data["type"] == "train"
    assert TrainConfig.from_dict(data) == custom
    assert Config.from_dict(data) == custom
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="nesterov"):
        TrainConfig.from_dict({"type": "train", "nesterov": True})


def test_recommended_configs():
    assert {"lenet5", "lenet300", "resnet"} <= set(RECOMMENDED)
    assert all(isinstance(config, TrainConfig) for config in RECOMMENDED.values())
    assert recommended_config("lenet5") is RECOMMENDED["lenet5"]
    assert recommended_config("torchslim.models:lenet300") is RECOMMENDED["lenet300"]
    assert recommended_config("my_pkg.nets:build") == TrainConfig()


# --- learning ----------------------------------------------------------------------------------------
def test_learns_separable_problem():
    train_set, test_set = split_blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    config = TrainConfig(epochs=5, batch_size=32, lr=1e-2)
    seen = []
    result = train(model, train_set, config, eval_data=test_set, progress=False, on_epoch_end=seen.append)

    assert isinstance(result, TrainResult)
    assert result.final_accuracy is not None and result.final_accuracy > 0.95
    assert evaluate(model, test_set) == pytest.approx(result.final_accuracy)
    assert result.steps == 5 * math.ceil(384 / 32)
    assert result.resumed_from is None
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    assert seen == result.history
    for record in result.history:
        assert set(record) == {"epoch", "train_loss", "train_accuracy", "eval_accuracy", "lr", "seconds"}
        assert record["lr"] == pytest.approx(1e-2)
        assert 0.0 <= record["train_accuracy"] <= 1.0
        assert record["seconds"] >= 0
    losses = [r["train_loss"] for r in result.history]
    assert all(later <= earlier * 1.01 for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] / 3
    assert result.history[-1]["train_accuracy"] > 0.95
    assert not model.training  # eval mode at the end


def test_no_eval_data_gives_none_accuracy():
    train_set, _ = split_blobs()
    model = dropout_mlp()
    result = train(model, train_set, TrainConfig(epochs=1), progress=False)
    assert result.final_accuracy is None
    assert result.history[0]["eval_accuracy"] is None


def test_schedulers_change_lr_per_epoch():
    train_set, _ = split_blobs(n=64)
    step = train(dropout_mlp(), train_set, TrainConfig(epochs=4, lr=0.1, optimizer="sgd", scheduler="step",
                                                       step_size=2, gamma=0.5), progress=False)
    assert [r["lr"] for r in step.history] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    config = TrainConfig(epochs=4, lr=0.1, scheduler="cosine")
    cosine = train(dropout_mlp(), train_set, config, progress=False)
    expected = [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [r["lr"] for r in cosine.history] == pytest.approx(expected)


def test_batchnorm_model_skips_a_last_batch_of_one():
    x, y = blobs(n=33, num_classes=4).tensors  # 33 = 2 * 16 + 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    sizes = []

    def loss_fn(model, inputs, targets):
        sizes.append(inputs.shape[0])
        return F.cross_entropy(model(inputs), targets)

    result = train(model, TensorDataset(x, y), TrainConfig(epochs=2, batch_size=16), loss_fn=loss_fn,
                   progress=False)
    assert sizes == [16, 16, 16, 16]
    assert result.steps == 4
    # Without BatchNorm every sample is used.
    sizes.clear()
    train(dropout_mlp(), TensorDataset(x, y), TrainConfig(epochs=1, batch_size=16), loss_fn=loss_fn,
          progress=False)
    assert sizes == [16, 16, 1]


def test_model_in_train_mode_during_training_and_eval_after():
    train_set, _ = split_blobs(n=64)
    modes = []

    def loss_fn(model, inputs, targets):
        modes.append(model.training)
        return F.cross_entropy(model(inputs), targets)

    model = dropout_mlp()
    model.eval()
    train(model, train_set, TrainConfig(epochs=2, batch_size=16), eval_data=train_set, loss_fn=loss_fn,
          progress=False)
    assert modes and all(modes)
    assert not model.training


def test_max_grad_norm_limits_first_update():
    train_set, _ = split_blobs(n=64)
    config = TrainConfig(epochs=1, batch_size=64, lr=1.0, optimizer="sgd", momentum=0.0, max_grad_norm=1e-3)
    model = dropout_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    train(model, train_set, config, progress=False)
    pairs = zip(model.parameters(), before, strict=True)
    change = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in pairs))
    assert float(change) == pytest.approx(1e-3, rel=1e-3)  # one SGD step of lr * clipped norm


# --- determinism -------------------------------------------------------------------------------------
def test_same_seed_same_parameters_and_different_seed_differs():
    train_set, _ = split_blobs()
    config = TrainConfig(epochs=2, batch_size=32, seed=3)
    a, b, c = dropout_mlp(), dropout_mlp(), dropout_mlp()
    result_a = train(a, train_set, config, progress=False)
    result_b = train(b, train_set, config, progress=False)
    train(c, train_set, config.replace(seed=4), progress=False)
    assert_same_params(a, b)
    assert without_seconds(result_a.history) == without_seconds(result_b.history)
    assert not same_params(a, c)


def test_seeded_runs_give_pinned_results():
    """Pinned values of two seeded runs (computed before train() was split into small functions): a change in the
    order of RNG draws, shuffles, clipping, the schedule or the records shows here. The tolerance allows only
    float rounding differences between CPUs."""
    x, y = blobs(n=96, num_classes=4, features=16, seed=0).tensors
    model = dropout_mlp()
    config = TrainConfig(epochs=3, batch_size=20, lr=0.05, optimizer="sgd", scheduler="cosine", max_grad_norm=1.0,
                         seed=3)
    result = train(model, TensorDataset(x[:72], y[:72]), config, eval_data=TensorDataset(x[72:], y[72:]),
                   progress=False)
    assert [r["train_loss"] for r in result.history] == pytest.approx([1.74423638, 0.55867955, 0.17323932], rel=1e-5)
    assert [r["train_accuracy"] for r in result.history] == pytest.approx([14 / 72, 68 / 72, 1.0])
    assert [r["eval_accuracy"] for r in result.history] == pytest.approx([22 / 24, 1.0, 1.0])
    sums = [float(p.detach().double().abs().sum()) for p in model.parameters()]
    assert sums == pytest.approx([66.16004962, 3.62306313, 13.08947301, 0.26667626], rel=1e-5)

    torch.manual_seed(0)
    cnn = create_model("student_cnn", image_size=8, width=4)
    images = tiny_images(n=49, num_classes=10, size=8, seed=3)
    result = train(cnn, images, TrainConfig(epochs=2, batch_size=16, augment_shift=1, seed=5), progress=False)
    assert result.steps == 8
    assert [r["train_loss"] for r in result.history] == pytest.approx([2.30113021, 2.28481375], rel=1e-5)
    sums = [float(p.detach().double().abs().sum()) for p in cnn.parameters()]
    assert sums == pytest.approx([5.90351119, 0.78474015, 22.9925645, 0.88483218, 30.64957625, 0.86004115], rel=1e-5)


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    n, seed = 50, 7
    data = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, dtype=torch.long))
    seen: list[int] = []

    def record_order(model, inputs, targets):
        seen.extend(inputs[:, 0].long().tolist())
        return F.cross_entropy(model(inputs), targets)

    torch.manual_seed(0)
    train(nn.Linear(1, 2), data, TrainConfig(epochs=2, batch_size=8, seed=seed), loss_fn=record_order,
          progress=False)
    expected = [
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        for epoch in range(2)
    ]
    assert seen == expected[0] + expected[1]
    assert expected[0] != expected[1]


def test_augment_shift_is_seeded_and_changes_training():
    data = image_data()
    config = TrainConfig(epochs=2, batch_size=32, augment_shift=1)
    a, b, plain = tiny_cnn(), tiny_cnn(), tiny_cnn()
    train(a, data, config, progress=False)
    train(b, data, config, progress=False)
    train(plain, data, config.replace(augment_shift=0), progress=False)
    assert_same_params(a, b)
    assert not same_params(a, plain)


def test_random_shift_moves_whole_pixels_with_replicated_edges():
    x = torch.randn(6, 2, 7, 9)
    torch.manual_seed(5)
    shifted = random_shift(x, 2)
    torch.manual_seed(5)
    offsets = torch.randint(-2, 3, (6, 2))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    assert shifted.shape == x.shape
    for b, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(shifted[b], padded[b, :, 2 - dy:2 - dy + 7, 2 - dx:2 - dx + 9])
    assert random_shift(x, 0) is x


def test_set_seed_seeds_torch_random_numpy():
    import random

    import numpy as np

    set_seed(11)
    first = (torch.rand(3), random.random(), np.random.rand())
    set_seed(11)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


# --- checkpoint and resume ---------------------------------------------------------------------------
def test_resume_after_crash_equals_uninterrupted(tmp_path):
    train_set, test_set = split_blobs(n=200 * 4 // 3)  # 200 train samples: 7 steps per epoch at batch 32
    config = TrainConfig(
        epochs=3, batch_size=32, optimizer="sgd", lr=0.05, scheduler="cosine", checkpoint_every=2
    )

    reference = dropout_mlp()
    full = train(reference, train_set, config, eval_data=test_set, checkpoint_path=tmp_path / "a.pt",
                 progress=False)
    assert full.steps == 21

    crashed = dropout_mlp()
    path = tmp_path / "b.pt"
    with pytest.raises(Interrupted):
        # Step 11 never completes: the last checkpoint is at global step 10 (epoch 2, 3 steps in).
        train(crashed, train_set, config, eval_data=test_set, checkpoint_path=path,
              loss_fn=crashing_loss(after=10), progress=False)
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, 10)
    assert not same_params(crashed, reference)

    resumed_model = dropout_mlp()
    resumed = train(resumed_model, train_set, config, eval_data=test_set, checkpoint_path=path, resume=True,
                    progress=False)
    assert resumed.resumed_from == 10
    assert resumed.steps == full.steps
    assert_same_params(resumed_model, reference)
    assert without_seconds(resumed.history) == without_seconds(full.history)
    assert resumed.final_accuracy == full.final_accuracy
    assert path.exists()  # left for the caller


def _child_main(path: str, kill_after: int) -> None:
    """Run in a subprocess: train with augmentation and kill this process with SIGKILL mid-run."""
    calls = [0]

    def loss_fn(model, inputs, targets):
        calls[0] += 1
        if calls[0] > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(model(inputs), targets)

    train(tiny_cnn(), image_data(), KILL_CONFIG, checkpoint_path=path, loss_fn=loss_fn, progress=False)


KILL_CONFIG = TrainConfig(epochs=3, batch_size=16, lr=3e-3, checkpoint_every=4, augment_shift=1, seed=5)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    reference = tiny_cnn()
    full = train(reference, image_data(), KILL_CONFIG, progress=False)
    assert full.steps == 18  # 96 samples / 16 = 6 steps per epoch

    path = tmp_path / "run.ckpt"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('child_test_train', {str(HERE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module._child_main({str(path)!r}, 10)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(path, weights_only=True)
    # Checkpoints at steps 4, 6 (epoch end), 8; step 11 never ran.
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)

    model = tiny_cnn()
    resumed = train(model, image_data(), KILL_CONFIG, checkpoint_path=path, resume=True, progress=False)
    assert resumed.resumed_from == 8
    assert resumed.steps == 18
    assert_same_params(model, reference)
    assert without_seconds(resumed.history) == without_seconds(full.history)


def test_resume_with_more_epochs_continues(tmp_path):
    train_set, _ = split_blobs()
    config = TrainConfig(epochs=3, batch_size=64, optimizer="sgd", lr=0.05, scheduler="step", step_size=1,
                         gamma=0.5)
    reference = dropout_mlp()
    train(reference, train_set, config, progress=False)

    path = tmp_path / "grow.pt"
    model = dropout_mlp()
    train(model, train_set, config.replace(epochs=2), checkpoint_path=path, progress=False)
    result = train(model, train_set, config, checkpoint_path=path, resume=True, progress=False)
    assert result.resumed_from == 12
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.025, 0.0125])
    assert_same_params(model, reference)


def test_resume_finished_run_does_nothing(tmp_path):
    train_set, test_set = split_blobs(n=128)
    path = tmp_path / "done.pt"
    model = dropout_mlp()
    config = TrainConfig(epochs=2)
    first = train(model, train_set, config, eval_data=test_set, checkpoint_path=path, progress=False)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    again = train(model, train_set, config, eval_data=test_set, checkpoint_path=path, resume=True,
                  progress=False)
    assert again.steps == first.steps == again.resumed_from
    assert again.history == first.history
    assert again.final_accuracy == first.final_accuracy
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    train_set, _ = split_blobs(n=64)
    path = tmp_path / "new.pt"
    a, b = dropout_mlp(), dropout_mlp()
    result = train(a, train_set, TrainConfig(epochs=1), checkpoint_path=path, resume=True, progress=False)
    train(b, train_set, TrainConfig(epochs=1), progress=False)
    assert result.resumed_from is None
    assert path.exists()
    assert_same_params(a, b)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_checkpoint_contents(tmp_path):
    train_set, _ = split_blobs(n=64)
    path = tmp_path / "c.pt"
    config = TrainConfig(epochs=2, batch_size=16, scheduler="cosine")
    model = dropout_mlp()
    train(model, train_set, config, checkpoint_path=path, progress=False)
    state = torch.load(path, weights_only=True)
    assert state["config"] == config.to_dict()
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, 6)
    assert state["scheduler"] is not None and state["optimizer"]["state"]
    assert isinstance(state["rng"], torch.Tensor) and state["rng"].dtype == torch.uint8
    assert len(state["history"]) == 2
    for record in state["history"]:
        assert all(v is None or type(v) in (int, float) for v in record.values())
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_resume_with_different_config_names_field(tmp_path):
    train_set, _ = split_blobs(n=64)
    path = tmp_path / "cfg.pt"
    train(dropout_mlp(), train_set, TrainConfig(epochs=2, lr=1e-3), checkpoint_path=path, progress=False)
    with pytest.raises(TorchSlimError, match=r"TrainConfig\.lr = 0\.01.*lr = 0\.001"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=2, lr=1e-2), checkpoint_path=path, resume=True,
              progress=False)
    with pytest.raises(TorchSlimError, match="epochs"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1, lr=1e-3), checkpoint_path=path, resume=True,
              progress=False)


def test_resume_with_other_model_is_clear_error(tmp_path):
    train_set, _ = split_blobs(n=64)
    path = tmp_path / "m.pt"
    train(dropout_mlp(), train_set, TrainConfig(epochs=1), checkpoint_path=path, progress=False)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TorchSlimError, match="does not match this model"):
        train(other, train_set, TrainConfig(epochs=1), checkpoint_path=path, resume=True, progress=False)


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    train_set, _ = split_blobs(n=64)
    path = tmp_path / "mine.pt"
    path.write_bytes(b"precious user data")
    with pytest.raises(TorchSlimError, match="resume=True"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1), checkpoint_path=path, progress=False)
    assert path.read_bytes() == b"precious user data"


def test_checkpoint_directory_must_exist(tmp_path):
    train_set, _ = split_blobs(n=64)
    model = dropout_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TorchSlimError, match="does not exist"):
        train(model, train_set, TrainConfig(epochs=1), checkpoint_path=tmp_path / "no" / "c.pt",
              progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # failed before any work


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(str(marker)), "epoch": 0}, path)

    # The planted file really runs code when unpickled without weights_only ...
    probe = tmp_path / "probe.pt"
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    # ... and train(resume=True) refuses it without running anything.
    train_set, _ = split_blobs(n=64)
    with pytest.raises(TorchSlimError, match="weights_only=True"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1), checkpoint_path=path, resume=True,
              progress=False)
    assert not marker.exists()
    assert path.exists()  # the user's file is left alone


def test_corrupt_checkpoint_is_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    train_set, _ = split_blobs(n=64)
    with pytest.raises(TorchSlimError, match="broken.pt"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1), checkpoint_path=path, resume=True,
              progress=False)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    with pytest.raises(TorchSlimError, match="missing optimizer"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1), checkpoint_path=partial, resume=True,
              progress=False)


# --- loss_fn hook ------------------------------------------------------------------------------------
def test_custom_loss_fn_is_used():
    train_set, _ = split_blobs(n=128)
    calls = []

    def push_logit_zero(model, inputs, targets):
        calls.append(inputs.shape[0])
        return -model(inputs)[:, 0].mean()

    model = dropout_mlp()
    result = train(model, train_set, TrainConfig(epochs=2, batch_size=32, lr=1e-2), loss_fn=push_logit_zero,
                   eval_data=train_set, progress=False)
    assert len(calls) == result.steps == 6
    assert sum(calls) == 2 * 96
    x, y = train_set.tensors
    with torch.no_grad():
        predictions = model(x).argmax(dim=1)
    assert bool((predictions == 0).all())
    share_of_zero = float((y == 0).float().mean())
    assert result.final_accuracy == pytest.approx(share_of_zero)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] < 0


def test_loss_fn_receives_targets_on_model_device_and_may_use_a_teacher():
    train_set, _ = split_blobs(n=64)
    teacher = dropout_mlp(seed=1).eval()
    seen = {}

    def distill(model, inputs, targets):
        with torch.no_grad():
            soft = F.softmax(teacher(inputs), dim=1)
        seen["targets"] = targets
        return F.kl_div(F.log_softmax(model(inputs), dim=1), soft, reduction="batchmean")

    model = dropout_mlp()
    result = train(model, train_set, TrainConfig(epochs=1, batch_size=16), loss_fn=distill, progress=False)
    assert seen["targets"].dtype == torch.int64
    assert result.history[0]["train_accuracy"] is not None  # scored from the student's own output


def test_loss_fn_must_return_scalar():
    train_set, _ = split_blobs(n=64)
    with pytest.raises(TorchSlimError, match="scalar"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1),
              loss_fn=lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), progress=False)


# --- input errors ------------------------------------------------------------------------------------
def test_empty_train_data():
    empty = TensorDataset(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        train(dropout_mlp(), empty, TrainConfig(epochs=1), progress=False)


def test_empty_eval_data():
    train_set, _ = split_blobs(n=64)
    empty = TensorDataset(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="eval_data is empty"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1), eval_data=empty, progress=False)
    with pytest.raises(DataError, match="empty"):
        evaluate(dropout_mlp(), empty)


@pytest.mark.parametrize("bad_label", [12, 10, -1])
def test_label_out_of_range_names_label_and_range(bad_label):
    x = torch.randn(32, 1, 28, 28)
    y = torch.arange(32) % 10
    y[17] = bad_label
    model = create_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError) as info:
        train(model, TensorDataset(x, y), TrainConfig(epochs=1), progress=False)
    message = str(info.value)
    assert f"label {bad_label}" in message and "[0, 10)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_label_check_sees_through_subset_and_plain_datasets():
    x, y = blobs(n=64, num_classes=4).tensors
    y = y.clone()
    y[5] = 4
    with pytest.raises(DataError, match=r"label 4.*\[0, 4\)"):
        subset = Subset(TensorDataset(x, y), list(range(10)))
        train(dropout_mlp(), subset, TrainConfig(epochs=1), progress=False)
    with pytest.raises(DataError, match=r"label 4.*\[0, 4\)"):
        train(dropout_mlp(), ListDataset(x, y), TrainConfig(epochs=1, batch_size=8), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(bad):
    x, y = blobs(n=64).tensors
    x = x.clone()
    x[9, 3] = bad
    with pytest.raises(DataError, match="NaN or Inf.*sample 9"):
        train(dropout_mlp(), TensorDataset(x, y), TrainConfig(epochs=1), progress=False)
    with pytest.raises(DataError, match="NaN or Inf"):
        train(dropout_mlp(), ListDataset(x, y), TrainConfig(epochs=1, batch_size=8), progress=False)


def test_wrong_input_shape():
    with pytest.raises(DataError, match=r"does not accept inputs of shape \(8,\)"):
        train(dropout_mlp(), TensorDataset(torch.randn(10, 8), torch.zeros(10, dtype=torch.long)),
              TrainConfig(epochs=1), progress=False)


def test_augment_shift_needs_images():
    train_set, _ = split_blobs(n=64)
    with pytest.raises(DataError, match="augment_shift"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1, augment_shift=2), progress=False)


def test_nan_loss_from_loss_fn():
    train_set, _ = split_blobs(n=64)
    with pytest.raises(TorchSlimError, match=r"nan at epoch 1, step 1 .*lower the learning rate"):
        train(dropout_mlp(), train_set, TrainConfig(epochs=1),
              loss_fn=lambda m, x, y: m(x).sum() * float("nan"), progress=False)


def test_divergence_with_huge_lr_is_reported():
    train_set, _ = split_blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    with pytest.raises(TorchSlimError) as info:
        train(model, train_set, TrainConfig(epochs=20, lr=1e4, optimizer="sgd"), progress=False)
    message = str(info.value)
    assert "epoch" in message and "step" in message and "lr = 10000" in message
    assert not isinstance(info.value, DataError)


def test_model_without_trainable_parameters():
    model = dropout_mlp().requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        train(model, split_blobs(n=64)[0], TrainConfig(epochs=1), progress=False)


def test_config_must_be_train_config():
    with pytest.raises(ConfigError, match="TrainConfig"):
        train(dropout_mlp(), split_blobs(n=64)[0], {"epochs": 1}, progress=False)


# --- evaluate ----------------------------------------------------------------------------------------
def test_evaluate_counts_top1_and_restores_mode():
    x = torch.randn(300, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    y = model(x).argmax(dim=1).detach()
    y[:30] = (y[:30] + 1) % 4  # exactly 30 wrong
    model.train()
    assert evaluate(model, TensorDataset(x, y), batch_size=64) == pytest.approx(270 / 300)
    assert model.training
    model.eval()
    assert evaluate(model, ListDataset(x, y), batch_size=7) == pytest.approx(270 / 300)
    assert not model.training
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(model, TensorDataset(x, y), batch_size=0)


# --- progress ----------------------------------------------------------------------------------------
def test_progress_only_when_asked(capsys, monkeypatch):
    train_set, _ = split_blobs(n=64)
    train(dropout_mlp(), train_set, TrainConfig(epochs=2), progress=True)
    assert "epoch 2/2" in capsys.readouterr().err

    # the library is silent by default, even on a terminal (the CLI turns progress on; tests/test_progress.py)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train(dropout_mlp(), train_set, TrainConfig(epochs=2), progress=None)
    assert capsys.readouterr().err == ""


# --- accuracy on the embedded digits -----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from torchslim.data import load_data

    return load_data("digits")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "target"),
    [("lenet5", 0.97), ("lenet300", 0.95), ("resnet", 0.97), ("student_cnn", 0.97), ("student_mlp", 0.95)],
)
def test_recommended_settings_reach_target_accuracy(digits, name, target):
    torch.manual_seed(0)
    model = create_model(name)
    started = time.perf_counter()
    result = train(model, digits.train, RECOMMENDED[name], eval_data=digits.test, progress=False)
    seconds = time.perf_counter() - started
    print(f"{name}: test accuracy {result.final_accuracy:.4f} in {seconds:.1f} s with {RECOMMENDED[name]}")
    assert result.final_accuracy >= target
    assert evaluate(model, digits.test) == pytest.approx(result.final_accuracy)


def test_extra_dataset_tensors_reach_the_loss():
    data = blobs(n=64)
    x, y = data.tensors
    soft = torch.nn.functional.one_hot(y, 4).float()
    seen: list[torch.Tensor] = []

    def loss_fn(model, inputs, targets, extra):
        seen.append(extra)
        assert extra.shape == (inputs.shape[0], 4)
        # the extra rows belong to the same samples as the targets
        assert torch.equal(extra.argmax(dim=1), targets)
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    train(tiny_mlp(), TensorDataset(x, y, soft), TrainConfig(epochs=1, batch_size=16), loss_fn=loss_fn, progress=False)
    assert len(seen) == 4

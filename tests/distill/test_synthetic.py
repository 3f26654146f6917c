"""Simulated distillation: synthetic transfer sets (bn-inversion, mixup, noise) and data-free students."""

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.distill import KD, SyntheticData, distill, synthesize
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.train import TrainConfig, evaluate


@pytest.fixture(scope="module")
def bn_teacher(digits):
    torch.manual_seed(0)
    # widths (8, 16) crash torch 2.13's CPU backward (segfault, reproducible); (16, 32) trains
    teacher = ts.create_model("resnet", widths=(16, 32), blocks=(1, 1))
    ts.train(teacher, digits.train, TrainConfig(epochs=3, lr=3e-3, scheduler="cosine", augment_shift=2),
             progress=False)
    return teacher.eval()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"method": "gan"}, r"SyntheticData.method = 'gan' is invalid: expected one of 'bn-inversion', 'mixup', 'noise'"),
    ({"n": 0}, r"SyntheticData.n = 0 is invalid: expected an integer >= 1"),
    ({"batch_size": 1}, r"SyntheticData.batch_size = 1 is invalid: expected an integer >= 2"),
    ({"lr": 0}, r"SyntheticData.lr = 0 is invalid"),
])
def test_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        SyntheticData(**kwargs)


def test_presets_quick_is_the_default_and_thorough_the_longer_settings():
    assert SyntheticData.preset("quick") == SyntheticData()
    thorough = SyntheticData.preset("thorough", method="mixup", n=100)
    assert (thorough.method, thorough.n, thorough.steps, thorough.downsample, thorough.shift_views) == (
        "mixup", 100, 200, 1, 0)
    with pytest.raises(ConfigError, match="SyntheticData preset = 'slow' is invalid: expected one of quick, thorough"):
        SyntheticData.preset("slow")
    with pytest.raises(ConfigError, match="SyntheticData.n = 0 is invalid"):
        SyntheticData.preset("thorough", n=0)


def test_shift_views_hold_every_offset_labelled_once():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    source = torch.rand(4, 1, 8, 8)
    config = SyntheticData(method="noise", n=4, noise_std=0.0, max_shift=0, shift_views=1, seed=3)
    x, y = synthesize(teacher, config, input_shape=(1, 8, 8), source=source).tensors
    assert x.shape == (36, 1, 8, 8)  # 3 x 3 offsets of 4 samples
    made = synthesize(teacher, config.replace(shift_views=0), input_shape=(1, 8, 8), source=source).tensors[0]
    assert torch.equal(x[16:20], made)  # offset (0, 0), the 5th of 9, is the set as made
    # offset (dy, dx) = (-1, +1) (the 3rd view): image moved up one row and right one column, edges replicated
    assert torch.equal(x[8:12, :, :-1, 1:], made[:, :, 1:, :-1])
    assert torch.equal(x[8:12, :, -1, 1:], made[:, :, -1, :-1])
    with torch.no_grad():
        assert torch.equal(y, teacher(x).argmax(1))


def test_bn_inversion_without_any_data_teaches_a_student(bn_teacher, digits):
    """No real training image is used: the student learns from inputs inverted from the teacher's BatchNorm."""
    config = SyntheticData(method="bn-inversion", n=384, steps=60, batch_size=128, lr=0.1, downsample=2, seed=0,
                           shift_views=0)  # the live teacher labels the loop's shifted batches instead
    synthetic = synthesize(bn_teacher, config, input_shape=(1, 28, 28))
    x, y = synthetic.tensors
    assert x.shape == (384, 1, 28, 28) and torch.isfinite(x).all()
    assert torch.bincount(y, minlength=10).min() >= 10  # balanced targets: the teacher sees every class
    torch.manual_seed(0)
    student = ts.create_model("lenet5")
    # the live teacher labels every randomly shifted view of the few synthetic images
    distill(student, bn_teacher, config, KD(temperature=4.0, alpha=1.0), input_shape=(1, 28, 28),
            train_config=TrainConfig(epochs=30, lr=3e-3, scheduler="cosine", augment_shift=2), progress=False)
    # Measured: this small test teacher 70.8%, student 40.8% (chance is 10%): the inverted inputs carry the class.
    # The goal (>= 80% of the teacher) is measured with the full resnet teacher in
    # benchmarks/distillation.py (96%): a weak teacher's BatchNorm statistics describe the digits less well.
    assert evaluate(student, digits.test) >= 0.5 * evaluate(bn_teacher, digits.test)


def test_same_seed_same_samples_and_teacher_unchanged(bn_teacher):
    config = SyntheticData(n=4, steps=2, batch_size=4, shift_views=0)
    before = {k: v.clone() for k, v in bn_teacher.state_dict().items()}
    a = synthesize(bn_teacher, config, input_shape=(1, 28, 28)).tensors[0]
    b = synthesize(bn_teacher, config, input_shape=(1, 28, 28)).tensors[0]
    assert torch.equal(a, b)
    assert all(torch.equal(before[k], v) for k, v in bn_teacher.state_dict().items())  # running stats too
    assert not bn_teacher.training


def test_mixup_and_noise_use_only_the_source(bn_teacher, digits):
    source = digits.train.tensors[0][:10]
    mixed = synthesize(bn_teacher, SyntheticData(method="mixup", n=50, shift_views=0), input_shape=(1, 28, 28),
                       source=source)
    assert mixed.tensors[0].shape == (50, 1, 28, 28)
    noise = synthesize(bn_teacher, SyntheticData(method="noise", n=20, noise_std=0.0, max_shift=0, shift_views=0),
                       input_shape=(1, 28, 28), source=source)
    # no shift and no noise: every sample is one of the source images
    assert all(any(torch.equal(s, src) for src in source) for s in noise.tensors[0])
    with torch.no_grad():
        assert torch.equal(noise.tensors[1], bn_teacher(noise.tensors[0]).argmax(1))


def test_errors_before_any_work(bn_teacher, digits):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ModelError, match="needs a teacher with BatchNorm"):
        synthesize(plain, SyntheticData(n=2), input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="'mixup' needs source"):
        synthesize(bn_teacher, SyntheticData(method="mixup", n=2), input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="'bn-inversion' uses no samples"):
        synthesize(bn_teacher, SyntheticData(n=2), input_shape=(1, 28, 28), source=torch.zeros(2, 1, 28, 28))
    with pytest.raises(DataError, match=r"source samples have shape \(1, 8, 8\): expected \(1, 28, 28\)"):
        synthesize(bn_teacher, SyntheticData(method="noise", n=2), input_shape=(1, 28, 28),
                   source=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="needs the input shape"):
        distill(ts.create_model("student_mlp"), bn_teacher, SyntheticData(n=2))

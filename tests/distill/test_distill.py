"""Teacher-student distillation: the loss, the KD config, distill() with logit caching and feature hints."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import torchslim as ts
from torchslim.distill import KD, distill, distillation_loss, teacher_logits
from torchslim.distill.losses import attention_map, feature_loss
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.testing import blobs, tiny_mlp
from torchslim.train import TrainConfig, evaluate


# --- the loss ------------------------------------------------------------------------------------------
def test_loss_matches_hinton_formula():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    t, a = 3.0, 0.7
    p_t = F.softmax(zt / t, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(zs / t, dim=1))).sum(dim=1).mean()
    expected = a * t * t * kl + (1 - a) * F.cross_entropy(zs, y)
    got = distillation_loss(zs, zt, y, temperature=t, alpha=a)
    assert torch.allclose(got, expected, atol=1e-6)


def test_loss_is_zero_when_student_equals_teacher_and_alpha_one():
    z = torch.randn(4, 3)
    assert distillation_loss(z, z.clone(), None, temperature=4.0, alpha=1.0).abs() < 1e-6


def test_loss_alpha_zero_is_cross_entropy_and_teacher_gets_no_gradient():
    zs = torch.randn(4, 3, requires_grad=True)
    zt = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = distillation_loss(zs, zt, y, temperature=2.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(zs, y))
    distillation_loss(zs, zt, y, temperature=2.0, alpha=0.5).backward()
    assert zt.grad is None and zs.grad is not None


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"temperature": 0.0, "alpha": 0.5}, "temperature = 0.0"),
    ({"temperature": 1.0, "alpha": 1.5}, "alpha = 1.5"),
])
def test_loss_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_loss_rejects_mismatched_classes_and_missing_labels():
    with pytest.raises(DataError, match="same number of classes"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, temperature=1.0, alpha=1.0)
    with pytest.raises(ConfigError, match="needs labelled targets"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, temperature=1.0, alpha=0.5)


def test_feature_losses():
    a = torch.randn(2, 4, 5, 5)
    assert feature_loss(a, a.clone(), "mse") < 1e-9
    assert feature_loss(a, 3 * a, "cosine") < 1e-6  # scale-invariant
    assert feature_loss(a, 3 * a, "attention") < 1e-6
    assert feature_loss(a, torch.randn(2, 4, 5, 5), "mse") > 0.5
    # attention compares channel-summed maps: different widths are fine
    assert attention_map(torch.randn(2, 7, 5, 5)).shape == (2, 25)
    assert feature_loss(torch.randn(2, 3, 5, 5), a, "attention") >= 0
    with pytest.raises(ConfigError, match="feature_loss = 'l1'"):
        feature_loss(a, a, "l1")


# --- the config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "words"), [
    ({"temperature": -1.0}, r"KD.temperature = -1.0 is invalid: expected a number > 0"),
    ({"alpha": 2}, r"KD.alpha = 2 is invalid: expected a number in \[0, 1\]"),
    ({"features": ("layer3",)}, r"'layer3' is invalid: expected 'teacher.module.name:student.module.name'"),
    ({"features": ["a:b"]}, r"KD.features = \['a:b'\] is invalid"),
    ({"feature_weight": -0.1}, r"KD.feature_weight = -0.1"),
    ({"feature_loss": "l1"}, r"KD.feature_loss = 'l1' is invalid: expected one of 'mse', 'cosine', 'attention'"),
    ({"cache_logits": True, "features": ("a:b",)}, r"KD.cache_logits = True is invalid"),
])
def test_kd_config_errors_name_field_value_and_range(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        KD(**kwargs)


def test_kd_config_round_trips():
    config = KD(temperature=2.0, alpha=0.5, features=("stem.0:0",), feature_loss="cosine")
    assert ts.Config.from_dict(config.to_dict()) == config
    assert config.to_dict()["type"] == "kd"


# --- distill ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blob_teacher():
    data = blobs(n=256, num_classes=4, features=16, seed=0)
    torch.manual_seed(0)
    teacher = tiny_mlp(hidden=64)
    ts.train(teacher, data, TrainConfig(epochs=10, lr=1e-2), progress=False)
    return teacher.eval(), data


def test_distill_trains_student_toward_teacher_and_leaves_teacher_untouched(blob_teacher):
    teacher, data = blob_teacher
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()  # distill must run it in eval mode and restore this afterwards
    torch.manual_seed(1)
    student = tiny_mlp(hidden=8)
    out = distill(student, teacher, data, KD(alpha=1.0), train_config=TrainConfig(epochs=8, lr=1e-2), progress=False)
    assert out is student and not student.training
    assert teacher.training
    teacher.eval()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        agree = (student(data.tensors[0]).argmax(1) == teacher(data.tensors[0]).argmax(1)).float().mean()
    assert agree > 0.95
    # alpha=1 uses no labels at all: the student learned the teacher's function
    assert evaluate(student, data) > 0.9


def test_cached_logits_give_the_same_student_as_a_live_teacher(blob_teacher, tmp_path):
    teacher, data = blob_teacher
    torch.manual_seed(2)
    init = tiny_mlp(hidden=8)
    config = TrainConfig(epochs=2, lr=1e-2)
    live = distill(copy.deepcopy(init), teacher, data, KD(), train_config=config, progress=False)
    cached = distill(copy.deepcopy(init), teacher, data, KD(cache_logits=True), train_config=config,
                     progress=False, cache_dir=tmp_path)
    for a, b in zip(live.parameters(), cached.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    files = list(tmp_path.glob("teacher-logits-*.safetensors"))
    assert len(files) == 1
    # a second run reads the file instead of running the teacher
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = teacher_logits(teacher, data.tensors[0], cache_dir=tmp_path)
    finally:
        handle.remove()
    assert calls == [] and again.shape == (256, 4)
    # a changed teacher gets its own file
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed[1].weight.add_(0.1)
    teacher_logits(changed, data.tensors[0], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("teacher-logits-*.safetensors"))) == 2


def test_cache_refuses_shift_augmentation_and_cache_dir_needs_cache(blob_teacher, tmp_path):
    teacher, _ = blob_teacher
    images = TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="cache_logits = True is invalid with TrainConfig.augment_shift = 2"):
        distill(tiny_mlp(), teacher, images, KD(cache_logits=True), train_config=TrainConfig(augment_shift=2))
    with pytest.raises(ConfigError, match="cache_dir .* needs KD.cache_logits = True"):
        distill(tiny_mlp(), teacher, images, KD(), cache_dir=tmp_path)


def test_teacher_must_be_a_separate_model(blob_teacher):
    teacher, data = blob_teacher
    with pytest.raises(ModelError, match="the teacher is the student itself"):
        distill(teacher, teacher, data)
    shared = nn.Sequential(nn.Flatten(), teacher[1])
    with pytest.raises(ModelError, match="share 2 parameter tensor"):
        distill(shared, teacher, data)
    with pytest.raises(ModelError, match="student logits .* differ"):
        distill(tiny_mlp(num_classes=3), teacher, data, train_config=TrainConfig(epochs=1), progress=False)


def test_feature_hints_train_a_projection(digits):
    """FitNets: a learned 1x1 projection maps the student's 4 channels onto the teacher's 8."""
    torch.manual_seed(0)
    teacher = ts.create_model("student_cnn", width=8).eval()
    student = ts.create_model("student_cnn", width=4)
    small = torch.utils.data.Subset(digits.train, range(128))
    config = KD(features=("3:3",), feature_weight=1.0)

    def hint_error(model):
        from torchslim.distill.features import capture

        with torch.no_grad(), capture(teacher, ["3"], "teacher") as t, capture(model, ["3"], "student") as s:
            teacher(digits.test.tensors[0][:64])
            model(digits.test.tensors[0][:64])
        return t["3"], s["3"]

    distill(student, teacher, small, config, train_config=TrainConfig(epochs=3, lr=1e-2), progress=False)
    t, s = hint_error(student)
    assert s.shape[1] == 8 and t.shape[1] == 16  # the student keeps its own width: the projection is discarded
    assert isinstance(student, nn.Sequential) and len(list(student.parameters())) == 6


def test_feature_hints_reduce_the_feature_loss(digits):
    """With only the hint loss (alpha=0 and feature_weight high), the matched layer moves toward the teacher's."""
    from torchslim.distill.api import _with_projections
    from torchslim.distill.features import align, capture

    torch.manual_seed(0)
    teacher = ts.create_model("student_cnn", width=8).eval()
    student = ts.create_model("student_cnn", width=8)
    x = digits.train.tensors[0][:128]
    data = TensorDataset(x, digits.train.tensors[1][:128])
    config = KD(alpha=0.0, features=("3:3",), feature_weight=10.0, feature_loss="cosine")

    def cosine_gap():
        with torch.no_grad(), capture(teacher, ["3"], "teacher") as t, capture(student, ["3"], "student") as s:
            teacher(x)
            student(x)
        return float(feature_loss(*align(s["3"], t["3"]), "cosine"))

    before = cosine_gap()
    assert isinstance(_with_projections(student, teacher, data, [("3", "3")], config).projections[0], nn.Identity)
    distill(student, teacher, data, config, train_config=TrainConfig(epochs=5, lr=3e-3), progress=False)
    assert cosine_gap() < 0.5 * before


def test_feature_pairs_name_unknown_modules(blob_teacher):
    teacher, data = blob_teacher
    with pytest.raises(ModelError, match="teacher has no module named 'layer9': expected one of 0, 1, 2, 3"):
        distill(tiny_mlp(), teacher, data, KD(features=("layer9:1",)), progress=False)


def test_distilled_student_makes_fewer_digit_errors_than_the_same_student_alone(trained_lenet5, digits):
    """Hinton's comparison in small: same init, data order and epochs; only the loss differs.

    Measured (lenet5 teacher, 3 test errors): alone 7 / 8 / 13 errors, distilled 5 / 6 / 8 (seeds 1-3).
    """
    teacher = copy.deepcopy(trained_lenet5)
    alone_errors, distilled_errors = [], []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        init = ts.create_model("student_cnn", width=3)
        config = TrainConfig(epochs=50, batch_size=32, lr=3e-3, scheduler="cosine", seed=seed)
        alone = copy.deepcopy(init)
        ts.train(alone, digits.train, config, progress=False)
        distilled = distill(copy.deepcopy(init), teacher, digits.train, KD(temperature=2.0, alpha=0.9,
                                                                           cache_logits=True),
                            train_config=config, progress=False)
        alone_errors.append(round((1 - evaluate(alone, digits.test)) * len(digits.test)))
        distilled_errors.append(round((1 - evaluate(distilled, digits.test)) * len(digits.test)))
    assert all(d <= a for a, d in zip(alone_errors, distilled_errors, strict=True)), (alone_errors, distilled_errors)
    assert sum(distilled_errors) <= sum(alone_errors) - 4, (alone_errors, distilled_errors)

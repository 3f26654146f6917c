import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from torchslim.errors import DataError, ModelError
from torchslim.models import create_model, factory_of, is_allowlisted, list_models, register_model
from torchslim.models.compat import check_model_data, create_model_for_data
from torchslim.models.registry import register_scheme


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_models_have_the_published_sizes():
    assert n_params(create_model("lenet300")) == 266_610
    assert n_params(create_model("lenet5")) == 431_080
    teacher = n_params(create_model("resnet"))
    assert teacher >= 5 * 431_080
    assert n_params(create_model("student_mlp")) < 431_080 / 10


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"onnx_graph"}))  # onnx_graph wraps a graph
def test_every_model_maps_digit_images_to_ten_logits(name):
    model = create_model(name)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_resnet_has_batchnorm_and_options():
    model = create_model("resnet", widths=[8, 16], blocks=[1, 1], num_classes=5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ModelError, match="equally long"):
        create_model("resnet", widths=[8, 16], blocks=[1])


def test_factory_is_recorded_and_survives_deepcopy():
    model = create_model("lenet5", num_classes=7)
    assert factory_of(model) == {"name": "torchslim.models:lenet5", "kwargs": {"num_classes": 7}}
    assert factory_of(copy.deepcopy(model)) == factory_of(model)
    assert factory_of(nn.Linear(2, 2)) is None


def test_unknown_name_and_untrusted_factory_are_clear_errors():
    with pytest.raises(ModelError, match="'lenet6' is not registered: expected one of lenet300, lenet5"):
        create_model("lenet6")
    with pytest.raises(ModelError, match="outside the allowlist: pass trust_factory=True"):
        create_model("torch.nn:Identity", trust_factory=False)
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg'"):
        create_model("no_such_pkg:build")
    with pytest.raises(ModelError, match="rejected its arguments"):
        create_model("lenet5", widht=3)


def test_user_factory_by_module_path():
    model = create_model("torch.nn:Identity")
    assert isinstance(model, nn.Identity)
    assert factory_of(model)["name"] == "torch.nn:Identity"


def test_registry_accepts_new_models_and_refuses_duplicates():
    @register_model("toy-linear-for-test")
    def toy(num_classes: int = 10) -> nn.Module:
        """A toy."""
        return nn.Linear(4, num_classes)

    assert list_models()["toy-linear-for-test"] == "A toy."
    assert create_model("toy-linear-for-test", num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy-linear-for-test")(toy)


def test_create_model_for_data_sizes_inputs_and_outputs():
    model = create_model_for_data("lenet5", (3, 32, 32), 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert factory_of(model)["kwargs"] == {"num_classes": 4, "in_channels": 3, "image_size": 32}
    mlp = create_model_for_data("student_mlp", (20,), 3)
    assert mlp(torch.randn(5, 20)).shape == (5, 3)


def test_check_model_data_catches_shape_and_class_mismatches():
    model = create_model("lenet300")
    check_model_data(model, torch.randn(2, 1, 28, 28), 10, "digits")
    with pytest.raises(DataError, match=r"does not accept inputs of shape \(1, 32, 32\)"):
        check_model_data(model, torch.randn(2, 1, 32, 32), 10, "npz:x.npz")
    with pytest.raises(DataError, match="has 12 classes"):
        check_model_data(model, torch.randn(2, 1, 28, 28), 12, "npz:x.npz")


def test_import_torchslim_does_not_import_optional_runtimes():
    code = (
        "import sys, torchslim as ts; ts.create_model; ts.ConfigError;"
        "bad = [m for m in ('onnxruntime', 'transformers', 'triton') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_verbs_are_callable_in_any_import_order():
    code = (
        "import torchslim.train, torchslim.measure, torchslim as ts;"
        "assert callable(ts.train) and callable(ts.measure), (ts.train, ts.measure)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_registered_scheme_builds_models_and_is_allowlisted(monkeypatch):
    import torchslim.models.registry as registry

    monkeypatch.setattr(registry, "_SCHEMES", dict(registry._SCHEMES))
    seen = []

    def resolve(spec):
        seen.append(spec)
        return lambda width=2: nn.Linear(width, 1)

    assert not is_allowlisted("toy:net")
    register_scheme("toy", resolve)
    register_scheme("toy", resolve)  # the same resolver again is fine
    model = create_model("toy:net", trust_factory=False, width=3)
    assert model.in_features == 3 and seen == ["toy:net"]
    assert factory_of(model) == {"name": "toy:net", "kwargs": {"width": 3}} and is_allowlisted("toy:net")
    with pytest.raises(ValueError, match="scheme 'toy' is already registered"):
        register_scheme("toy", lambda spec: nn.Identity)
    with pytest.raises(ValueError, match=r"scheme = 'a.b' is invalid"):
        register_scheme("a.b", resolve)


def test_hf_specs_resolve_through_the_loader_torchslim_hf_registers():
    # the registry imports torchslim.hf on first use of an hf: spec; nothing in models imports it
    code = (
        "import sys\n"
        "from torchslim.models.registry import resolve_factory\n"
        "assert 'torchslim.hf' not in sys.modules\n"
        "factory, name = resolve_factory('hf:/nowhere', trust=False)\n"
        "assert name == 'hf:/nowhere' and callable(factory) and 'torchslim.hf.loading' in sys.modules\n"
        "from torchslim.hf.loading import hf_factory\n"
        "import torchslim.models.registry as r\n"
        "assert r._SCHEMES['hf'] is hf_factory\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

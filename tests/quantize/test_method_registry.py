"""A quantization method defined in this file (one config + one handler, registered here) works everywhere.

Nothing outside this file names it: ``quantize_``, recipes (``torchslim.compress``) and ``torchslim quantize --mode``
find it through the config registry.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import torchslim as ts
from torchslim import config as config_module
from torchslim.cli.main import main
from torchslim.config import Config, register_config
from torchslim.errors import ConfigError
from torchslim.quantize import api as quantize_api
from torchslim.quantize.layers import IntQuantLayer


@pytest.fixture(scope="module")
def symmetric_int():
    """``sym-int``: per-channel symmetric k-bit weights, a method the library does not have under this name."""

    @register_config("sym-int")
    @dataclasses.dataclass(frozen=True)
    class SymmetricInt(Config):
        """Symmetric per-channel integer weights."""

        stage = "quantize"

        bits: int = 8

        def validate(self) -> None:
            self.check_int("bits", 2, 8)

    @quantize_api.quantization_handler(SymmetricInt)
    def _symmetric(module, config):
        return IntQuantLayer.from_float(module, config.bits, "channel", 128, True, "nearest", "float16")

    yield SymmetricInt
    del config_module._CONFIGS["sym-int"], quantize_api._HANDLERS[SymmetricInt]


def _is_symmetric_int(model, bits: int) -> bool:
    layers = [m for m in model.modules() if isinstance(m, IntQuantLayer)]
    return bool(layers) and all(m.bits == bits and m.symmetric for m in layers)


def test_usable_through_quantize_(symmetric_int, tmp_path):
    torch.manual_seed(0)
    model = ts.create_model("lenet300").eval()
    report = ts.quantize_(model, symmetric_int(bits=6))
    assert {entry["type"] for entry in report.quantized.values()} == {"sym-int"}
    assert _is_symmetric_int(model, 6)
    ts.save(model, tmp_path / "q.slim")
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(ts.load(tmp_path / "q.slim")(x), model(x))


def test_usable_in_a_recipe(symmetric_int, digits, tmp_path):
    torch.manual_seed(0)
    recipe = ts.parse_recipe({"name": "new", "stages": [{"quantize": {"method": "sym-int", "bits": 5}}]})
    assert isinstance(recipe.stages[0].config, symmetric_int)
    result = ts.compress(ts.create_model("lenet300").eval(), digits, recipe, tmp_path / "run", latency=False,
                         report=False)
    assert _is_symmetric_int(ts.load(result.stages[0]["artifact"]), 5)
    # no QAT for it: refused, naming the methods that train
    with pytest.raises(ConfigError, match="method = 'sym-int': only method 'int' trains"):
        ts.parse_recipe({"name": "new", "stages": [{"quantize": {"method": "sym-int", "epochs": 1}}]})


def test_usable_from_the_cli(symmetric_int, tmp_path, capsys):
    torch.manual_seed(0)
    source = tmp_path / "m.slim"
    ts.save(ts.create_model("lenet300").eval(), source)
    out = tmp_path / "q.slim"
    assert main(["quantize", str(source), "--mode", "sym-int", "--bits", "3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "sym-int" and summary["compression_ratio"] > 6
    assert _is_symmetric_int(ts.load(out), 3)
    # an option the method does not take is refused, naming the flag and the options it has
    assert main(["quantize", str(source), "--mode", "sym-int", "--granularity", "group", "--out", str(out),
                 "--force"]) == 2
    assert "--granularity is invalid with --mode sym-int: expected only options of SymmetricInt (--bits)" in (
        capsys.readouterr().err)

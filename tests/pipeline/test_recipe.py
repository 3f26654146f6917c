"""Recipes: YAML stages validated whole before any work, errors naming the stage, the field and the value."""

import textwrap

import pytest

from torchslim.errors import ConfigError
from torchslim.pipeline.recipe import load_recipe, parse_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_issue_recipe_parses_into_configs(tmp_path):
    recipe = load_recipe(write(tmp_path, """
        name: lenet5-50x
        stages:
          - prune: {method: channel, amount: 0.5}
          - distill: {teacher: baseline, temperature: 4, alpha: 0.9, epochs: 5}
          - prune: {method: magnitude, scope: global, amount: 0.9, schedule: {kind: gradual, steps: 4}}
          - quantize: {method: int, bits: 4, granularity: channel}
          - export: {format: onnx, quant: int8-static}
    """))
    kinds = [s.kind for s in recipe.stages]
    assert kinds == ["prune", "distill", "prune", "quantize", "export"]
    assert type(recipe.stages[0].config).__name__ == "ChannelPruning" and recipe.stages[0].config.amount == 0.5
    assert recipe.stages[1].config.temperature == 4 and recipe.stages[1].train == {"epochs": 5}
    assert recipe.stages[2].schedule.kind == "gradual" and recipe.stages[2].schedule.steps == 4
    assert recipe.stages[3].config.bits == 4 and recipe.stages[3].train == {}
    assert recipe.stages[4].config.quant == "int8-static"
    assert parse_recipe(recipe.to_dict()) == recipe  # round trip


def test_every_example_recipe_is_valid():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[2].joinpath("examples", "recipes").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        assert load_recipe(path).stages


@pytest.mark.parametrize(("stage", "expected"), [
    ("- quantize: {method: int, bits: 9}",
     r"stage 2 \(quantize\): IntQuant.bits = 9 is invalid: expected an integer in \[2, 8\]"),
    ("- prune: {method: magnitude, treshold: 0.05}",
     r"stage 2 \(prune\): 'treshold' is not a field of this stage: expected one of method, .*threshold"),
    ("- prune: {method: magnitude, threshold: -1}",
     r"stage 2 \(prune\): MagnitudePruning.threshold = -1 is invalid"),
    ("- quantize: {method: int4}",
     r"stage 2 \(quantize\): method = 'int4' is invalid: expected one of int, codebook"),
    ("- shrink: {amount: 0.5}", r"stage 2 kind = 'shrink' is invalid: expected one of prune, quantize"),
    ("- prune: {method: channel, amount: 0.5, epochs: 0}", r"stage 2 \(prune\): TrainConfig.epochs = 0 is invalid"),
    ("- prune: {method: magnitude, threshold: 0.05, schedule: {kind: gradual, steps: 3}}",
     r"stage 2 \(prune\): schedule: PruneSchedule.kind = 'gradual' is invalid with MagnitudePruning.threshold"),
    ("- quantize: {method: half, epochs: 2}", r"stage 2 \(quantize\): epochs = 2 is invalid with method = 'half'"),
    ("- export: {format: tflite}", r"stage 2 \(export\): ExportStep.format = 'tflite' is invalid"),
])
def test_invalid_stage_names_stage_field_and_value(tmp_path, stage, expected):
    path = write(tmp_path, f"""
        name: bad
        stages:
          - prune: {{method: channel, amount: 0.5}}
          {stage}
    """)
    with pytest.raises(ConfigError, match=expected):
        load_recipe(path)


def test_quantized_layers_cannot_be_pruned_later():
    with pytest.raises(ConfigError, match=r"stage 2 \(prune\) comes after stage 1 .*before weight quantization"):
        parse_recipe({"name": "x", "stages": [{"quantize": {"bits": 4}}, {"prune": {"amount": 0.5}}]})
    with pytest.raises(ConfigError, match=r"stage 2 \(finetune\) comes after stage 1 \(int8 through ONNX Runtime\)"):
        parse_recipe({"name": "x", "stages": [{"quantize": {"method": "int8-static"}}, {"finetune": {"epochs": 1}}]})


def test_recipe_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="stages = None is invalid: expected a non-empty list"):
        parse_recipe({"name": "x"})
    with pytest.raises(ConfigError, match="'stage' is not a recipe key"):
        parse_recipe({"name": "x", "stage": []})
    with pytest.raises(ConfigError, match="stage 1 = .* expected a one-key mapping"):
        parse_recipe({"name": "x", "stages": [{"prune": {}, "quantize": {}}]})
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_recipe(write(tmp_path, "stages: [prune: {amount: 0.5"))
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


# --- methods come from the config registry ------------------------------------------------------------------------
def test_gptq_runs_in_a_recipe_on_the_training_split(small_model, digits, tmp_path):
    import torchslim as ts

    recipe = ts.parse_recipe({"name": "gptq", "stages": [{"quantize": {"method": "gptq", "bits": 4,
                                                                        "group_size": None}}]})
    result = ts.compress(small_model, digits, recipe, tmp_path / "run", latency=False, report=False)
    stage = result.stages[0]
    assert {entry["method"] for entry in stage["details"]["quantized"].values()} == {"gptq"}
    assert stage["measurement"]["artifact_bytes"] < result.input["measurement"]["artifact_bytes"] / 6
    assert stage["measurement"]["accuracy"] >= result.input["measurement"]["accuracy"] - 0.02
    # the saved file holds packed 4-bit layers that compute what GPTQ on the same calibration data computes
    import copy

    import torch

    from torchslim.quantize.layers import IntQuantLayer

    loaded = ts.load(stage["artifact"])
    layers = [m for m in loaded.modules() if isinstance(m, IntQuantLayer)]
    assert len(layers) == len(stage["details"]["quantized"]) and all(m.bits == 4 for m in layers)
    x = digits.test.tensors[0][:64]
    reference = copy.deepcopy(small_model)
    ts.quantize_(reference, recipe.stages[0].config, calib_inputs=digits)
    torch.testing.assert_close(loaded(x), reference(x))


@pytest.fixture
def registered_method():
    """A quantization method defined here (a config and a quantize_ handler only), removed afterwards."""
    import dataclasses

    from torchslim import config as config_module
    from torchslim.config import Config, register_config
    from torchslim.quantize import HalfPrecision
    from torchslim.quantize import api as quantize_api

    @register_config("test-half")
    @dataclasses.dataclass(frozen=True)
    class TestHalf(Config):
        """fp16 weights under another name."""

        stage = "quantize"

    @quantize_api.quantization_handler(TestHalf)
    def _half(module, config):
        return quantize_api._HANDLERS[HalfPrecision](module, HalfPrecision(dtype="fp16"))

    yield TestHalf
    del config_module._CONFIGS["test-half"], quantize_api._HANDLERS[TestHalf]


def test_a_method_registered_elsewhere_is_usable_in_a_recipe(registered_method, small_model, digits, tmp_path):
    import torchslim as ts
    from torchslim.pipeline.recipe import methods

    assert "test-half" in methods()["quantize"]
    recipe = ts.parse_recipe({"name": "new", "stages": [{"quantize": {"method": "test-half"}}]})
    result = ts.compress(small_model, digits, recipe, tmp_path / "run", latency=False, report=False)
    assert result.stages[0]["measurement"]["bits_per_weight"] == pytest.approx(16, abs=0.5)

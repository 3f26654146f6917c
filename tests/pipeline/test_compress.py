"""compress: stages run in order on a copy, each saved, reloaded and measured; the manifest holds the recipe."""

import json
import os

import pytest

import torchslim as ts
from torchslim.artifact import load, read_manifest
from torchslim.errors import TorchSlimError
from torchslim.pipeline.compress import compress
from torchslim.pipeline.recipe import parse_recipe

RECIPE = {
    "name": "small",
    "stages": [
        {"prune": {"method": "channel", "amount": 0.5, "epochs": 1}},
        {"prune": {"method": "magnitude", "scope": "global", "amount": 0.8, "epochs": 1}},
        {"quantize": {"method": "int", "bits": 4, "epochs": 1, "lr": 1e-4}},
        {"export": {"format": "onnx"}},
    ],
}


@pytest.fixture(scope="module")
def run(small_model, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    return compress(small_model, digits, parse_recipe(RECIPE), out, progress=False, latency=False)


def test_final_file_is_much_smaller_and_accurate(run, small_model):
    sizes = [s["measurement"]["artifact_bytes"] for s in run.stages[:3]]
    input_bytes = run.input["measurement"]["artifact_bytes"]
    assert sizes[0] < input_bytes / 2  # half the neurons of both hidden layers: 266,610 -> 125,660 parameters
    assert sizes[1] < sizes[0] / 3  # 80% sparse, stored sparse
    assert sizes[2] < sizes[1] / 2.5  # 4-bit codes, pruned zeros stay zero bytes
    assert os.path.getsize(run.final) < input_bytes / 20
    assert run.input["measurement"]["accuracy"] - run.final_measurement["accuracy"] < 0.05
    assert small_model.state_dict()["1.weight"].shape == (300, 784)  # the input model is untouched


def test_qat_keeps_the_pruned_zeros(run):
    pruned, quantized = run.stages[1]["measurement"], run.stages[2]["measurement"]
    assert quantized["nonzero_parameters"] <= pruned["nonzero_parameters"]
    assert quantized["sparsity"] > 0.75


def test_final_manifest_holds_the_recipe_and_measurement(run):
    manifest = read_manifest(run.final)
    record = manifest["recipe"][-1]
    assert record["stage"] == "compress" and record["name"] == "small"
    assert record["recipe"] == RECIPE
    assert [s["config"]["type"] for s in record["stages"]] == ["channel", "magnitude", "int", "recipe-export"]
    assert manifest["measurements"]["artifact_bytes"] == run.stages[2]["measurement"]["artifact_bytes"]
    assert load(run.final)  # loads


def test_every_stage_is_recorded_and_the_export_runs_in_onnxruntime(run, digits):
    state = json.loads((run.out_dir / "compress.json").read_text())
    assert [s["kind"] for s in state["stages"]] == ["prune", "prune", "quantize", "export"]
    export = state["stages"][3]
    assert export["runtime"] == "onnxruntime" and export["artifact"].endswith("model.onnx")
    assert export["measurement"]["artifact_bytes"] == os.path.getsize(run.out_dir / "model.onnx")
    # the ONNX graph computes what the quantized model computes (dequantized weights)
    assert abs(export["measurement"]["accuracy"] - state["stages"][2]["measurement"]["accuracy"]) < 0.01
    assert (run.out_dir / "report.md").is_file() and (run.out_dir / "report.html").is_file()


def test_rerun_needs_resume_or_force(run, small_model, digits):
    with pytest.raises(TorchSlimError, match=r"already holds a compress run \(compress.json\): pass --resume"):
        compress(small_model, digits, parse_recipe(RECIPE), run.out_dir, progress=False, latency=False)


def test_resume_skips_completed_stages(small_model, digits, tmp_path):
    recipe = parse_recipe({"name": "r", "stages": RECIPE["stages"][:3]})
    first = compress(small_model, digits, recipe, tmp_path, progress=False, latency=False, report=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("stage-*.slim")}
    (tmp_path / "stage-3-quantize.slim").unlink()  # as if the run died during stage 3
    second = compress(small_model, digits, recipe, tmp_path, resume=True, progress=False, latency=False, report=False)
    assert (tmp_path / "stage-1-prune.slim").stat().st_mtime_ns == stamps["stage-1-prune.slim"]
    assert (tmp_path / "stage-2-prune.slim").stat().st_mtime_ns == stamps["stage-2-prune.slim"]
    assert (tmp_path / "stage-3-quantize.slim").is_file()
    assert [s["seconds"] for s in second.stages[:2]] == [s["seconds"] for s in first.stages[:2]]
    changed = parse_recipe({"name": "r", "stages": [RECIPE["stages"][0], {"prune": {"amount": 0.5}}]})
    with pytest.raises(TorchSlimError, match="stage 2 of the recipe differs"):
        compress(small_model, digits, changed, tmp_path, resume=True, progress=False, latency=False)


def test_distill_stage_trains_a_named_student_from_the_baseline(small_model, digits, tmp_path):
    recipe = parse_recipe({"name": "kd", "stages": [
        {"distill": {"teacher": "baseline", "student": "student_mlp", "epochs": 3, "augment_shift": 0}}]})
    result = compress(small_model, digits, recipe, tmp_path, progress=False, latency=False, report=False)
    assert read_manifest(result.final)["factory"]["name"] == "torchslim.models:student_mlp"
    assert result.final_measurement["parameters"] == 25_450
    assert result.final_measurement["accuracy"] > 0.8


def test_int4_export_and_deploy_stages_write_checked_files(small_model, digits, tmp_path):
    recipe = ts.parse_recipe({"name": "int4-deploy", "stages": [
        {"quantize": {"method": "int", "bits": 4, "granularity": "group", "group_size": 16}},
        {"export": {"quant": "int4-weight"}},
        {"deploy": {"batch_sizes": [1], "routes": ["torch", "onnxruntime-fp32", "onnxruntime-int4"]}},
    ]})
    result = ts.compress(small_model, digits, recipe, tmp_path / "run", latency=False, report=False)
    export, deploy = result.stages[1], result.stages[2]
    assert export["details"]["parity"]["cosine"] > 0.95 and (tmp_path / "run" / "model-int4-weight.onnx").exists()
    route = deploy["details"]["route"]
    assert route in ("torch", "onnxruntime-fp32", "onnxruntime-int4")
    assert deploy["deploy"]["route"] == route and set(deploy["deploy"]["speedup"]) == {"1"}
    assert (tmp_path / "run" / "deploy" / "deploy.md").exists()
    assert deploy["measurement"]["accuracy"] >= result.stages[0]["measurement"]["accuracy"] - 0.005
    # the final model is the quantized one, not an output file
    assert ts.read_manifest(result.final)["measurements"]["accuracy"] == result.stages[0]["measurement"]["accuracy"]


def test_a_deploy_stage_with_a_bad_field_is_refused():
    with pytest.raises(ts.ConfigError, match=r"stage 1 \(deploy\): DeployStep.batch_sizes = \(0,\) is invalid"):
        ts.parse_recipe({"name": "x", "stages": [{"deploy": {"batch_sizes": [0]}}]})
    with pytest.raises(ts.ConfigError, match="DeployStep.routes = .*tensorrt.* is invalid"):
        ts.parse_recipe({"name": "x", "stages": [{"deploy": {"routes": ["tensorrt"]}}]})


def test_with_latency_every_artifact_is_deployed_and_reported(small_model, digits, tmp_path, quick_deploy):
    recipe = ts.parse_recipe({"name": "q", "stages": [{"quantize": {"method": "int", "bits": 4}},
                                                      {"export": {"format": "onnx"}}]})
    result = ts.compress(small_model, digits, recipe, tmp_path / "run")
    rows = [result.input] + result.stages
    assert [r["deploy"]["route"] in ("torch", "onnxruntime-fp32", "onnxruntime") for r in rows] == [True] * 3
    assert rows[2]["deploy"]["route"] == "onnxruntime"  # an exported graph runs as stored
    assert all(set(r["deploy"]["speedup"]) == {"1", "32"} for r in rows)
    assert all(call["reference"] is not None for call in quick_deploy)  # timed against the input model
    assert (tmp_path / "run" / "deployed" / "1-quantize" / "deploy.md").is_file()
    table = (tmp_path / "run" / "report.md").read_text()
    assert "deployed route" in table and f"| {rows[1]['deploy']['route']} |" in table

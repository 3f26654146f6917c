"""The CLI on hf:DIR models: quantize (k-bit, GPTQ, dynamic int8), prune heads/FFN, distill on unlabelled text."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim as ts
from torchslim.cli.main import main
from torchslim.hf import encode

from .conftest import TEXTS


def _run(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_quantize_hf_gptq_with_text_calibration(gpt2_dir, tmp_path, texts_file, capsys):
    out = tmp_path / "gptq.slim"
    summary = _run(capsys, "quantize", f"hf:{gpt2_dir}", "--mode", "gptq", "--bits", "4", "--granularity", "group",
                   "--group-size", "32", "--no-clip-search", "--text", str(texts_file), "--out", str(out))
    weights = gpt2_dir / "model.safetensors"
    assert summary["input_bytes"] == weights.stat().st_size and summary["output_bytes"] == out.stat().st_size
    assert summary["output_bytes"] < 0.6 * summary["input_bytes"]
    assert 0.9 < summary["cosine"] < 1.0 and summary["top1_agreement"] > 0.5
    manifest = ts.read_manifest(out)
    config = manifest["recipe"][-1]["config"]
    assert config["act_order"] is True and config["clip_search"] is False  # the default and the flag
    assert manifest["measurements"]["text_fidelity"]["cosine"] == summary["cosine"]
    model = ts.load(out)
    assert type(model.model.transformer.h[0].mlp.c_fc).__name__ == "IntQuantLayer"


def test_quantize_hf_int4_and_dynamic_int8(bert_dir, tmp_path, texts_file, capsys):
    q4 = _run(capsys, "quantize", f"hf:{bert_dir}", "--granularity", "group", "--group-size", "32",
              "--out", str(tmp_path / "q4.slim"))
    assert q4["cosine"] is None and q4["compression_ratio"] > 2.5  # no --text: no fidelity measured
    int8 = _run(capsys, "quantize", f"hf:{bert_dir}", "--mode", "int8-dynamic", "--text", str(texts_file),
                "--out", str(tmp_path / "int8.slim"))
    assert int8["cosine"] > 0.99
    graph = ts.load(tmp_path / "int8.slim")
    ids, mask = encode(ts.load_hf(bert_dir), TEXTS)
    assert graph(ids, mask).shape == (len(TEXTS), ids.shape[1], 64)
    # no --text: the example inputs are one short sentence (an hf model never needs --data for int8-dynamic)
    bare = _run(capsys, "quantize", f"hf:{bert_dir}", "--mode", "int8-dynamic", "--out", str(tmp_path / "bare.slim"))
    assert bare["cosine"] is None and bare["output_bytes"] < int8["output_bytes"] * 1.1
    assert ts.load(tmp_path / "bare.slim")(ids, mask).shape == (len(TEXTS), ids.shape[1], 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "gptq"], "--mode gptq needs --text FILE"),
        (["--data", "digits"], "--data = 'digits' is invalid for a Hugging Face model"),
        (["--mode", "int8-static"], "int8-static is invalid for a Hugging Face model"),
        (["--mode", "gptq", "--granularity", "tensor"], "--granularity = 'tensor' is invalid with --mode gptq"),
        (["--act-order"], "--act-order is invalid with --mode int"),
        (["--no-clip-search"], "--clip-search is invalid with --mode int"),
        (["--sweep", "2,4"], "--sweep is invalid for hf:DIR"),
    ],
)
def test_quantize_hf_errors_before_writing(bert_dir, tmp_path, capsys, args, message):
    out = tmp_path / "x.slim"
    assert message in _error(capsys, "quantize", f"hf:{bert_dir}", *args, "--out", str(out))
    assert not out.exists()


def test_quantize_text_needs_an_hf_model(tmp_path, texts_file, capsys):
    path = ts.save(ts.create_model("lenet300"), tmp_path / "m.slim")
    err = _error(capsys, "quantize", str(path), "--text", str(texts_file), "--out", str(tmp_path / "x.slim"))
    assert "--text is for Hugging Face models" in err


def test_prune_hf_heads_and_ffn(bert_dir, tmp_path, capsys):
    out = tmp_path / "pruned.slim"
    summary = _run(capsys, "prune", f"hf:{bert_dir}", "--structured", "--amount", "0.5", "--heads", "0.5",
                   "--out", str(out))
    assert summary["parameters_after"] < 0.75 * summary["parameters_before"]
    assert summary["output_bytes"] < 0.75 * summary["input_bytes"]
    model = ts.load(out)
    attention = model.model.encoder.layer[1].attention.self
    assert attention.num_attention_heads == 2 and model.model.encoder.layer[0].intermediate.dense.out_features == 64
    assert "--data = 'digits' is invalid" in _error(capsys, "prune", f"hf:{bert_dir}", "--structured", "--amount",
                                                    "0.5", "--data", "digits", "--out", str(tmp_path / "y.slim"))


def test_distill_hf_every_other_narrower_student_on_text(bert_dir, tmp_path, texts_file, capsys):
    out = tmp_path / "student.slim"
    summary = _run(capsys, "distill", "--teacher", f"hf:{bert_dir}", "--student", "every-other", "--ffn", "0.5",
                   "--text", str(texts_file), "--seq-len", "8", "--epochs", "10", "--lr", "3e-4", "--batch-size", "2",
                   "--out", str(out), "--no-progress")
    assert summary["student_parameters"] < 0.5 * summary["teacher_parameters"]
    assert summary["features"] == ["model.encoder.layer.1:model.encoder.layer.0"] and summary["output_loss"] == "mse"
    assert summary["after"]["mse"] < 0.7 * summary["before"]["mse"]
    model = ts.load(out)
    assert ts.read_manifest(out)["factory"]["kwargs"]["layers"] == [0]
    assert model.config.num_hidden_layers == 1 and model.model.encoder.layer[0].intermediate.dense.out_features == 64
    ids = ts.hf.text_dataset(model, TEXTS, seq_len=8).tensors[0]
    teacher = ts.load_hf(bert_dir)
    with torch.no_grad():
        mse = float(torch.nn.functional.mse_loss(model(ids), teacher(ids)))
    assert mse == pytest.approx(summary["after"]["mse"], rel=1e-4)  # the saved student is the one measured


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--student", "every-other"], "--text is missing"),
        (["--student", "layers:0,x", "--text", "T"], "--student = 'layers:0,x' is invalid"),
        (["--student", "layers:5", "--text", "T"], "layers = [5] is invalid: index 5 is outside [0, 2)"),
        (["--student", "every-other", "--text", "T", "--alpha", "0.5"], "--alpha = 0.5 is invalid with --text"),
        (["--student", "every-other", "--text", "T", "--synthetic", "noise"], "--synthetic is invalid"),
        (["--student", "every-other", "--text", "T", "--dropout", "1.5"], "--dropout = 1.5 is invalid"),
    ],
)
def test_distill_hf_errors_before_writing(bert_dir, tmp_path, texts_file, capsys, args, message):
    out = tmp_path / "x.slim"
    args = [str(texts_file) if a == "T" else a for a in args]
    err = _error(capsys, "distill", "--teacher", f"hf:{bert_dir}", *args, "--out", str(out), "--no-progress")
    assert message in err
    assert not out.exists()


def test_export_takes_hf_dir_and_the_graph_takes_any_sequence_length(bert_dir, tmp_path, texts_file, capsys):
    from torchslim.models.onnx_graph import OnnxGraph

    out = tmp_path / "bert-int8.onnx"
    summary = _run(capsys, "export", f"hf:{bert_dir}", "--quant", "int8-dynamic", "--text", str(texts_file),
                   "--out", str(out))
    assert summary["input"] == f"hf:{bert_dir}" and summary["parity"]["cosine"] > 0.99
    graph, model = OnnxGraph.from_bytes(out.read_bytes()), ts.load_hf(bert_dir)
    ids, mask = encode(model, ["a cat", "the slow dog and the fast cat ran under a big red tree " * 3])
    assert ids.shape[1] > 30  # longer than any text the graph was traced with
    got, want = graph(ids, mask), model(ids, mask)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    assert "for image models" in _error(capsys, "export", f"hf:{bert_dir}", "--data", "digits", "--out",
                                        str(tmp_path / "x.onnx"))


def test_deploy_takes_hf_dir_and_a_quantized_hf_slim(bert_dir, tmp_path, texts_file, capsys):
    q8 = tmp_path / "q8.slim"
    _run(capsys, "quantize", f"hf:{bert_dir}", "--bits", "8", "--out", str(q8))
    routes = "torch,torch-w8a8,onnxruntime-fp32,onnxruntime-int8-dynamic,onnxruntime-int8-static,openvino-fp32"
    report = _run(capsys, "deploy", str(q8), "--reference", f"hf:{bert_dir}", "--text", str(texts_file),
                  "--batch", "1,4", "--routes", routes, "--min-run-time", "0.02", "--out", str(tmp_path / "d"))
    status = {r["name"]: r["status"] for r in report["routes"]}
    assert status["torch"] == status["onnxruntime-fp32"] == status["onnxruntime-int8-dynamic"] == "ok"
    assert status["onnxruntime-int8-static"] == status["openvino-fp32"] == "not applicable"
    assert report["baseline"].startswith("given:") and report["chosen"] in status
    assert (tmp_path / "d" / "deploy.md").is_file()
    plain = _run(capsys, "deploy", f"hf:{bert_dir}", "--routes", "torch,onnxruntime-fp32", "--batch", "1",
                 "--min-run-time", "0.02", "--out", str(tmp_path / "e"))  # the fp32 model is its own baseline
    assert {r["name"]: r["status"] for r in plain["routes"]} == {"torch": "ok", "onnxruntime-fp32": "ok"}

"""export_hf / `torchslim export --format hf`: compressed-tensors and dense Hugging Face directories."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import torchslim as ts
from torchslim.cli.main import main
from torchslim.errors import ConfigError, ModelError, TorchSlimError
from torchslim.export.hf import export_hf

IDS = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2]])


def _reload(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_int4_group_writes_pack_quantized_that_transformers_reloads_with_the_same_weights(llama_dir, tmp_path):
    model = ts.load_hf(llama_dir)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32, symmetric=True))
    report = export_hf(model, tmp_path / "int4")
    config = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and report.formats == {"pack-quantized": 15}
    assert [(g["targets"], g["weights"]["num_bits"]) for g in config["config_groups"].values()] == [(["Linear"], 4)]
    assert (tmp_path / "int4" / "tokenizer.json").is_file() and not report.dense_layers
    dense = sum(p.numel() * 2 for p in ts.load_hf(llama_dir).parameters())  # the model in fp16
    assert report.bytes < 0.5 * dense
    reloaded = _reload(tmp_path / "int4")
    with torch.no_grad():
        logits = reloaded(IDS).logits  # decompresses on the first forward
        expected = model(IDS)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.9999
    assert (logits - expected).abs().max() < 1e-3  # fp16 norms and embeddings
    layer = model.model.model.layers[1].mlp.down_proj
    written = reloaded.model.layers[1].mlp.down_proj.weight
    assert torch.equal(written, layer.dequantize_weight())  # torchslim's codes and scales, exactly


def test_asymmetric_int8_channel_is_naive_quantized_and_says_why(llama_dir, tmp_path):
    model = ts.load_hf(llama_dir)
    ts.quantize_(model, ts.IntQuant(bits=8, granularity="channel", symmetric=False), filter_fn=_not_lm_head)
    report = export_hf(model, tmp_path / "int8", dtype="float32")
    assert report.formats == {"naive-quantized": 14} and "symmetric=True" in report.notes[0]
    ignored = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignored == ["lm_head"]  # the float Linear layer
    assert report.parity["cosine"] > 0.9999
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        _reload(tmp_path / "int8")(IDS)
    assert torch.equal(_reload_weight(tmp_path / "int8"), layer.dequantize_weight())


def _not_lm_head(module, name: str) -> bool:
    return name != "model.lm_head"


def _reload_weight(directory):
    reloaded = _reload(directory)
    with torch.no_grad():
        reloaded(IDS)
    return reloaded.model.layers[0].self_attn.q_proj.weight


def test_pruned_and_shortened_gpt2_is_written_dense_with_a_config_that_builds_it(gpt2_dir, tmp_path):
    model = ts.load_hf(gpt2_dir)
    ts.prune_transformer_(model, ts.ChannelPruning(amount=0.5))
    model = ts.drop_layers(model, keep=[1])
    report = export_hf(model, tmp_path / "small", dtype="float32")
    assert report.formats == {} and report.parity["max_abs_error"] < 1e-4
    reloaded = _reload(tmp_path / "small")
    assert reloaded.config.n_inner == 128 and reloaded.config.n_layer == 1
    assert type(reloaded.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, model(IDS), atol=1e-4)


def test_errors_leave_nothing_behind(bert_dir, tmp_path):
    with pytest.raises(ModelError, match="needs a Hugging Face model"):
        export_hf(ts.create_model("lenet300"), tmp_path / "x")
    model = ts.load_hf(bert_dir)
    with pytest.raises(ConfigError, match="dtype = 'int8' is invalid"):
        export_hf(model, tmp_path / "x", dtype="int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(TorchSlimError, match="already exists"):
        export_hf(model, tmp_path / "taken")
    ts.prune_transformer_(model, ts.ChannelPruning(amount=0.0, heads=0.5))
    with pytest.raises(ModelError, match="head-pruned models cannot be written"):
        export_hf(model, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_export_format_hf(llama_dir, tmp_path, capsys):
    slim = tmp_path / "q.slim"
    assert main(["quantize", f"hf:{llama_dir}", "--bits", "4", "--granularity", "group", "--group-size", "32",
                 "--symmetric", "--out", str(slim)]) == 0
    capsys.readouterr()
    out = tmp_path / "hf"
    assert main(["export", str(slim), "--format", "hf", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["formats"] == {"pack-quantized": 15} and summary["parity"]["cosine"] > 0.999
    assert (out / "config.json").is_file()
    assert main(["export", str(slim), "--format", "hf", "--quant", "int8-dynamic", "--out", str(tmp_path / "y")]) == 2
    assert "--quant is invalid with --format hf" in capsys.readouterr().err


def test_a_group_size_that_does_not_divide_a_width_writes_those_layers_dense_and_says_so(llama_dir, tmp_path):
    model = ts.load_hf(llama_dir)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=48, symmetric=True))  # 64 = 48 + 16
    report = export_hf(model, tmp_path / "g48", dtype="float32")
    assert report.formats == {} and len(report.dense_layers) == 15
    assert any("group size [48] does not divide" in note for note in report.notes)
    assert report.parity["cosine"] > 0.9999


class _UserLlama(transformers.LlamaForCausalLM):
    """A model class transformers does not export (as remote code would be)."""


def test_quantized_embeddings_go_dense_and_an_unexported_class_reloads_through_auto(llama_dir, tmp_path):
    model = ts.load_hf(llama_dir)
    model.model.__class__ = _UserLlama
    ts.quantize_(model, ts.IntQuant(bits=8, granularity="channel", symmetric=True, embeddings=True))
    assert type(model.model.model.embed_tokens).__name__ == "IntQuantLayer"
    report = export_hf(model, tmp_path / "emb", dtype="float32")
    assert report.parity["cosine"] > 0.9999 and report.dense_layers == ["model.embed_tokens"]
    reloaded = _reload(tmp_path / "emb")
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.model.embed_tokens.dequantize_weight())

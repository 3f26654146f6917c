"""hf:DIR models through every technique: load, prune heads/FFN, quantize (k-bit, GPTQ, int8), save/load, ONNX."""

from __future__ import annotations

import copy
import gc
import socket
import subprocess
import sys

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.export.int4 import dequantized_copy
from torchslim.hf import encode, read_texts, reference_model, text_fidelity

from .conftest import TEXTS


def _batch(model):
    return encode(model, TEXTS)  # padded: several lengths


def test_load_hf_offline_with_tokenizer(bert_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = ts.load_hf(f"hf:{bert_dir}")
    ids, mask = _batch(model)
    assert ids.dtype == torch.int64 and int(mask.sum()) < mask.numel()
    out = model(ids, mask)
    assert out.shape == (len(TEXTS), ids.shape[1], 64) and model.output == "hidden"
    assert ts.read_manifest(ts.save(model, bert_dir.parent / "plain.slim"))["factory"] == {
        "name": f"hf:{bert_dir.resolve()}", "kwargs": {"weights": False}
    }
    same = ts.create_model(f"hf:{bert_dir}")
    assert torch.equal(same(ids, mask), out)


def test_load_hf_reads_the_weights_into_memory_with_the_directorys_settings(gpt2_dir, llama_dir, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="50KB")
    transformers.GenerationConfig(max_new_tokens=7, eos_token_id=0).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    for directory, cls in ((gpt2_dir, transformers.GPT2LMHeadModel), (sharded, transformers.LlamaForCausalLM)):
        model = ts.load_hf(directory)
        if sys.platform.startswith("linux"):  # ordinary allocations, not views of a mapping of the weight files
            gc.collect()
            assert ".safetensors" not in open("/proc/self/maps").read()
        reference = cls.from_pretrained(directory, attn_implementation="eager").eval()  # maps its files
        torch.testing.assert_close(model(ids), reference(ids).logits)  # GPT-2: Conv1D made Linear (same values)
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
        hf = model.model
        tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight  # GPT-2's are
        assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == tied
        del model, hf, reference
    assert ts.load_hf(sharded).generation_config.max_new_tokens == 7


def test_load_hf_memory_maps_with_a_safetensors_without_pread(llama_dir, monkeypatch):
    import safetensors

    ids = torch.tensor([[2, 5, 7, 9, 3]])
    expected = ts.load_hf(llama_dir)(ids)
    real = safetensors.safe_open

    def old_safe_open(*args, **kwargs):
        if "backend" in kwargs:
            raise TypeError("safe_open.__new__() got an unexpected keyword argument 'backend'")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", old_safe_open)
    assert torch.equal(ts.load_hf(llama_dir)(ids), expected)


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        ts.load_hf(tmp_path / "missing")
    with pytest.raises(ModelError, match="has no config.json"):
        ts.load_hf(tmp_path)


def test_import_torchslim_does_not_import_transformers():
    code = (
        "import sys, torchslim, torchslim.hf, torchslim.quantize.gptq; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bert_heads_and_ffn_pruned_saved_loaded_exported(bert_dir, tmp_path):
    model = ts.load_hf(bert_dir)
    original = copy.deepcopy(model)
    ids, mask = _batch(model)
    report = ts.prune_transformer_(model, ts.ChannelPruning(amount=0.5, heads=0.5), (ids, mask))
    assert report.params_after < 0.6 * report.params_before
    attention = model.model.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (2, 32, 32)
    assert model.config.intermediate_size == 64
    assert model.model.encoder.layer[1].intermediate.dense.out_features == 64
    path = ts.save(model, tmp_path / "pruned.slim")
    assert ts.read_manifest(path)["factory"]["kwargs"]["heads"] == {
        f"model.encoder.layer.{i}.attention.self": 2 for i in range(2)
    }
    loaded = ts.load(path)
    assert loaded.model.encoder.layer[1].attention.self.num_attention_heads == 2
    expected = model(ids, mask)
    assert torch.equal(loaded(ids, mask), expected)
    parity = ts.check_parity(loaded, ts.export_onnx(loaded, (ids, mask)), (ids, mask), atol=1e-4)
    assert parity["max_abs_error"] <= 1e-4
    fid = text_fidelity(loaded, original, TEXTS)
    assert fid["output"] == "hidden" and fid["top1_agreement"] is None and -1.0 <= fid["cosine"] < 1.0


def test_gpt2_ffn_pruned_roundtrip_and_fused_heads_refused(gpt2_dir, tmp_path):
    model = ts.load_hf(gpt2_dir)
    assert isinstance(model.model.transformer.h[0].attn.c_attn, torch.nn.Linear)  # Conv1D converted
    ids, mask = _batch(model)
    with pytest.raises(ConfigError, match="no attention module can lose a head"):
        ts.prune_transformer_(copy.deepcopy(model), ts.ChannelPruning(amount=0.0, heads=0.5), (ids, mask))
    ts.prune_transformer_(model, ts.ChannelPruning(amount=0.5), (ids, mask))
    assert model.model.transformer.h[0].mlp.c_fc.out_features == 128 and model.config.n_inner == 128
    loaded = ts.load(ts.save(model, tmp_path / "gpt2.slim"))
    assert torch.equal(loaded(ids, mask), model(ids, mask))
    parity = ts.check_parity(loaded, ts.export_onnx(loaded, (ids, mask)), (ids, mask), atol=1e-4)
    assert parity["top1_agreement"] == 1.0


def test_gpt2_int4_and_gptq_saved_loaded_exported_and_gptq_more_faithful(gpt2_dir, tmp_path):
    fp32 = ts.load_hf(gpt2_dir)
    ids, mask = _batch(fp32)
    fp32_bytes = ts.save(fp32, tmp_path / "fp32.slim").stat().st_size
    rtn, gptq = copy.deepcopy(fp32), copy.deepcopy(fp32)
    ts.quantize_(rtn, ts.IntQuant(bits=3, granularity="group", group_size=32))
    report = ts.gptq_(gptq, ts.GPTQ(bits=3, group_size=32, act_order=True), (ids, mask))
    assert len(report.quantized) == 9 and all(r["method"] == "gptq" for r in report.quantized.values())
    path = ts.save(gptq, tmp_path / "gptq.slim")
    assert path.stat().st_size < 0.6 * fp32_bytes  # the fp32 token/position embeddings stay
    loaded = ts.load(path)
    assert torch.equal(loaded(ids, mask), gptq(ids, mask))
    plain, packed = dequantized_copy(loaded)  # packed layers exported with exactly their dequantized weights
    assert len(packed) == 9
    parity = ts.check_parity(loaded, ts.export_onnx(plain, (ids, mask)), (ids, mask), atol=1e-4)
    assert parity["top1_agreement"] == 1.0
    rtn_fid, gptq_fid = text_fidelity(rtn, fp32, TEXTS), text_fidelity(loaded, fp32, TEXTS)
    assert rtn_fid["output"] == "logits" and rtn_fid["tokens"] == int(mask.sum())
    assert 1 - gptq_fid["cosine"] < 0.7 * (1 - rtn_fid["cosine"])
    assert gptq_fid["top1_agreement"] >= rtn_fid["top1_agreement"]


def test_bert_dynamic_int8_fidelity(bert_dir, tmp_path, texts_file):
    model = ts.load_hf(bert_dir)
    ids, mask = _batch(model)
    graph = ts.quantize_dynamic(model, example_inputs=(ids, mask))
    loaded = ts.load(ts.save(graph, tmp_path / "int8.slim"))
    assert torch.allclose(loaded(ids, mask), graph(ids, mask))
    reference = reference_model(loaded)
    fid = text_fidelity(loaded, reference, read_texts(texts_file))
    assert fid["texts"] == len(TEXTS) and fid["cosine"] > 0.99


def test_int8_graphs_of_token_models_take_any_batch_and_sequence_length(bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ORT's symbolic shape inference gives up here and saves a graph in the cwd
    model = ts.load_hf(bert_dir)
    ids, mask = _batch(model)
    graph = ts.quantize_dynamic(model, example_inputs=(ids[:1, :5], mask[:1, :5]))  # traced at 1 x 5 tokens
    torch.manual_seed(0)
    longer = torch.randint(5, 20, (7, 48))
    padded = torch.ones_like(longer)
    padded[:, 30:] = 0  # padding honoured through the attention mask
    got, want = graph(longer, padded), model(longer, padded)
    assert got.shape == want.shape == (7, 48, 64)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    assert list(tmp_path.iterdir()) == []  # nothing left in the user's working directory


def test_read_texts_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        read_texts(tmp_path / "empty.txt")


def test_cli_eval_text_reports_fidelity(bert_dir, tmp_path, texts_file, capsys):
    import json

    from torchslim.cli.main import main

    model = ts.load_hf(bert_dir)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32))
    path = ts.save(model, tmp_path / "q4.slim")
    assert main(["eval", str(path), "--text", str(texts_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["texts"] == len(TEXTS) and result["bytes"] == path.stat().st_size
    assert 0.9 < result["cosine"] < 1.0 and result["top1_agreement"] is None
    assert main(["eval", str(path), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err

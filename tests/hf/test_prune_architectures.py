"""Structural pruning on the architectures the coverage table found broken: rotary, gated FFN, GQA, tied weights."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

import torchslim as ts
from torchslim.coverage.zoo import ARCHITECTURES, TiedLM, example_inputs, make
from torchslim.errors import ConfigError, ModelError
from torchslim.prune import ChannelPruning


def _model(name, tmp_path):
    return make(name, tmp_path), example_inputs(ARCHITECTURES[name])


def test_gated_ffn_loses_the_same_neurons_in_gate_and_up_and_reloads(tmp_path):
    model, inputs = _model("llama", tmp_path)  # rotary position embeddings: q/k groups never converge
    ts.prune_transformer_(model, ChannelPruning(amount=0.5), inputs)
    mlp = model.model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 32
    with torch.no_grad():
        want = model(*inputs)
    ts.save(model, tmp_path / "llama.slim")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "llama.slim")(*inputs), want)


def _reload_in_new_process(saved, tmp_path):
    """Load each ``(path, inputs, expected)`` with ``ts.load`` in a new process; returns its per-file results."""
    tensors, paths = {}, []
    for i, (path, inputs, expected) in enumerate(saved):
        paths.append(str(path))
        tensors[f"{i}.expected"] = expected.contiguous()
        tensors.update({f"{i}.input.{k}": t.contiguous() for k, t in enumerate(inputs)})
    spec = tmp_path / "reload.safetensors"
    safetensors.torch.save_file(tensors, spec, metadata={"paths": json.dumps(paths)})
    proc = subprocess.run([sys.executable, "-m", "torchslim.coverage.reload", str(spec)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prune_heads_and_check(name, tmp_path):
    """Prune 30% of heads and FFN neurons; check shapes and configs; returns (model, inputs, expected outputs)."""
    model, inputs = _model(name, tmp_path)  # 4 query heads of 8 over 2 key/value heads (phi: 4 and 4, rotary)
    config = model.config
    kv = config.num_key_value_heads
    report = ts.prune_transformer_(model, ChannelPruning(amount=0.3, heads=0.3), inputs)
    heads, kv_after = (2, 1) if kv == 2 else (2, 2)  # ceil(0.3 * 2) = 1 group of 2 query heads; phi: 2 heads of 4
    for i, layer in enumerate(model.model.model.layers):
        attn = layer.self_attn
        row = report.heads[f"model.model.layers.{i}.self_attn"]
        assert (row["before"], row["after"]) == (4, heads)
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (
            heads * 8, kv_after * 8, kv_after * 8)
        out = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        assert (out.in_features, out.out_features) == (heads * 8, 32)  # the residual stream stays
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_after, 8)
    with torch.no_grad():
        want = model(*inputs)
    return model, inputs, want


def test_grouped_query_heads_go_by_key_value_group_and_the_config_follows(tmp_path):
    model, inputs, want = _prune_heads_and_check("llama", tmp_path)
    loaded = ts.load(ts.save(model, tmp_path / "llama.slim"))
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (2, 1)
    assert set(loaded.head_counts().values()) == {2}
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), want)


def test_head_pruned_grouped_query_model_exports_as_a_hugging_face_directory(tmp_path):
    from torchslim.export.hf import export_hf

    model, inputs, _ = _prune_heads_and_check("llama", tmp_path)
    report = export_hf(model, tmp_path / "out", example_inputs=inputs)  # reloaded by transformers, compared
    assert report.parity["cosine"] > 0.999
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)


@pytest.mark.slow  # five models pruned and one reload process: about a minute on 2 shared cores
def test_grouped_query_and_rotary_models_reload_in_a_new_process(tmp_path):
    saved = []
    for name in ("llama", "mistral", "qwen2", "gemma", "phi"):
        model, inputs, want = _prune_heads_and_check(name, tmp_path)
        saved.append((ts.save(model, tmp_path / f"{name}.slim"), inputs, want))
    assert _reload_in_new_process(saved, tmp_path) == [{"status": "ok", "message": ""}] * 5


def test_removed_key_value_group_is_the_one_silenced_in_the_dense_model(tmp_path):
    dense, inputs = _model("llama", tmp_path)
    model = copy.deepcopy(dense)
    ts.prune_transformer_(model, ChannelPruning(amount=0.0, heads=0.5), inputs)
    silenced = copy.deepcopy(dense)
    with torch.no_grad():
        for layer, pruned in zip(silenced.model.model.layers, model.model.model.layers, strict=True):
            v, kept = layer.self_attn.v_proj.weight, pruned.self_attn.v_proj.weight
            for g in range(2):  # the group whose value rows are gone: zero them (its heads then add nothing)
                if not any(torch.equal(v[g * 8:(g + 1) * 8], kept[r * 8:(r + 1) * 8]) for r in range(1)):
                    v[g * 8:(g + 1) * 8] = 0
        torch.testing.assert_close(model(*inputs), silenced(*inputs))


def test_multi_query_attention_is_a_config_error_naming_the_module(tmp_path):
    model, inputs = _model("llama", tmp_path)
    for layer in model.model.model.layers:  # one key/value head for all 4 query heads
        attn = layer.self_attn
        attn.k_proj, attn.v_proj, attn.num_key_value_groups = nn.Linear(32, 8), nn.Linear(32, 8), 4
    with pytest.raises(ConfigError, match="layers.0.self_attn: heads kept: grouped-query attention with one key/value"):
        ts.prune_transformer_(model, ChannelPruning(amount=0.0, heads=0.5), inputs)


def test_tied_weights_stay_one_tensor_after_structural_pruning(tmp_path):
    torch.manual_seed(0)
    model = ts.create_model("torchslim.coverage.zoo:build", arch="tied-weights")
    assert isinstance(model, TiedLM)
    ids = example_inputs(ARCHITECTURES["tied-weights"])[0]
    ts.prune_(model, ChannelPruning(amount=0.5), example_inputs=ids)
    assert model.out.weight is model.embed.weight
    assert model.embed.weight.shape == (128, 16)
    assert len(list(model.parameters())) == len(list(model.named_parameters(remove_duplicate=False))) - 1


def test_tied_weights_reached_by_two_groups_keep_those_groups_and_the_rest_is_pruned(tmp_path):
    model, inputs = _model("t5", tmp_path)  # one embedding, two residual streams (encoder, decoder)
    t5 = model.model
    report = ts.prune_(model, ChannelPruning(amount=0.3), example_inputs=inputs)
    assert t5.shared.weight.shape == (128, 32)  # the residual streams stay whole, the embedding stays one tensor
    assert t5.encoder.embed_tokens.weight is t5.shared.weight is t5.decoder.embed_tokens.weight is t5.lm_head.weight
    assert t5.encoder.block[0].layer[1].DenseReluDense.wi.out_features < 64  # FFN neurons still go
    kept = [r for r in report.skipped.values() if "tied weight model.shared.weight" in r]
    assert kept and "other dependency groups prune too" in kept[0]
    with torch.no_grad():
        want = model(*inputs)
    loaded = ts.load(ts.save(model, tmp_path / "t5.slim"), trust_factory=True)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), want)


def test_head_pruned_attention_in_a_user_wrapper_reloads_in_a_new_process(tmp_path):
    model, inputs = _model("whisper-encoder", tmp_path)  # WhisperEncoder in a user module: no HFModel head record
    ts.prune_transformer_(model, ChannelPruning(amount=0.0, heads=0.5), inputs)
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.q_proj.out_features) == (1, 16)
    with torch.no_grad():
        want = model(*inputs)
    path = ts.save(model, tmp_path / "whisper.slim")
    assert ts.read_manifest(path)["attributes"]["model.layers.0.self_attn"] == {"num_heads": 1}
    assert _reload_in_new_process([(path, inputs, want)], tmp_path) == [{"status": "ok", "message": ""}]


def test_swin_heads_are_a_model_error_naming_the_modules_and_leave_the_model_alone(tmp_path):
    model, inputs = _model("swin", tmp_path)  # a per-head relative position bias table: no head group passes
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ModelError, match="removed no head of attention 'model.swin.encoder.layers.0.blocks.0"):
        ts.prune_transformer_(model, ChannelPruning(amount=0.3, heads=0.3), inputs)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.slow  # EfficientNet's dependency graph takes ~15 s to trace on 2 shared cores
def test_pruned_convnext_and_efficientnet_reload_in_a_new_process(tmp_path):
    saved = []
    for name in ("convnext", "efficientnet"):  # ConvNextLayerNorm, EfficientNetDepthwiseConv2d: no codec of their own
        model, inputs = _model(name, tmp_path)
        ts.prune_(model, ChannelPruning(amount=0.3), example_inputs=inputs[0])
        with torch.no_grad():
            want = model(*inputs)
        saved.append((ts.save(model, tmp_path / f"{name}.slim"), inputs, want))
    assert "shapes" in ts.read_manifest(saved[0][0]) and "shapes" in ts.read_manifest(saved[1][0])
    assert _reload_in_new_process(saved, tmp_path) == [{"status": "ok", "message": ""}] * 2

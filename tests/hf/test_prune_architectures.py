"""Structural pruning on the architectures the coverage table found broken: rotary, gated FFN, GQA, tied weights."""

from __future__ import annotations

import pytest
import torch

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


def test_head_pruning_through_rotary_embeddings_is_a_model_error_not_an_endless_loop(tmp_path):
    model, inputs = _model("phi", tmp_path)  # q/k/v of equal width: heads are tried, through the rotary halves
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ModelError, match="does not converge.*ChannelPruning\\(heads=0\\)"):
        ts.prune_transformer_(model, ChannelPruning(amount=0.3, heads=0.5), inputs)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing half-done


def test_grouped_query_attention_heads_error_names_the_module(tmp_path):
    model, inputs = _model("mistral", tmp_path)
    with pytest.raises(ConfigError, match="self_attn: grouped-query attention \\(q/k/v widths \\[32, 16, 16\\]\\)"):
        ts.prune_transformer_(model, ChannelPruning(amount=0.3, heads=0.5), inputs)


def test_tied_weights_stay_one_tensor_after_structural_pruning(tmp_path):
    torch.manual_seed(0)
    model = ts.create_model("torchslim.coverage.zoo:build", arch="tied-weights")
    assert isinstance(model, TiedLM)
    ids = example_inputs(ARCHITECTURES["tied-weights"])[0]
    ts.prune_(model, ChannelPruning(amount=0.5), example_inputs=ids)
    assert model.out.weight is model.embed.weight
    assert model.embed.weight.shape == (128, 16)
    assert len(list(model.parameters())) == len(list(model.named_parameters(remove_duplicate=False))) - 1


def test_tied_weights_pruned_differently_are_a_model_error(tmp_path):
    model, inputs = _model("t5", tmp_path)  # one embedding, two residual streams (encoder, decoder)
    with pytest.raises(ModelError, match="tied weights model.shared.weight .*cannot stay one tensor"):
        ts.prune_(model, ChannelPruning(amount=0.3), example_inputs=inputs)

"""AWQ: activation-aware scales folded into the producing norm / up_proj keep the float function, beat
round-to-nearest where a few input channels dominate, and save/load like IntQuant."""

import pytest
import torch
import transformers  # noqa: F401  (the tiny Llama fixture)

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize.awq import AWQ, awq_, awq_scale_


def _salient(llama_dir):
    """The tiny Llama with a few strong input channels (as trained LLMs have), and calibration batches."""
    model = ts.load_hf(llama_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64)[:4]] *= 25.0
    calib = [torch.randint(0, model.model.config.vocab_size, (4, 24)) for _ in range(4)]
    return model, calib


def _error(model, reference, ids):
    with torch.inference_mode():
        return float((model(ids) - reference).pow(2).mean())


def test_scaling_keeps_the_float_model_and_folds_into_norms_and_up_proj(llama_dir):
    model, calib = _salient(llama_dir)
    ids = torch.randint(0, model.model.config.vocab_size, (2, 16))
    with torch.inference_mode():
        before = model(ids)
    norm = model.model.model.layers[0].input_layernorm.weight.clone()
    results = awq_scale_(model, AWQ(bits=3, group_size=32), calib)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=1e-4)
    first = "model.model.layers.0."
    qkv = results[f"{first}self_attn.q_proj,{first}self_attn.k_proj,{first}self_attn.v_proj"]
    assert qkv["exponent"] > 0 and qkv["folded_into"] == f"{first}input_layernorm"
    assert qkv["error_awq"] < qkv["error_rtn"]
    assert not torch.equal(model.model.model.layers[0].input_layernorm.weight, norm)
    down = results[f"{first}mlp.down_proj"]
    assert down["exponent"] == 0 or down["folded_into"] == f"{first}mlp.up_proj"
    assert results[f"{first}self_attn.o_proj"]["exponent"] == 0  # nothing to fold into


def test_awq_beats_round_to_nearest_and_saves_like_intquant(llama_dir, tmp_path):
    reference_model, calib = _salient(llama_dir)
    ids = torch.cat(calib)
    with torch.inference_mode():
        reference = reference_model(ids)
    rtn, _ = _salient(llama_dir)
    ts.quantize_(rtn, ts.IntQuant(bits=3, granularity="group", group_size=32))
    awq, _ = _salient(llama_dir)
    report = awq_(awq, AWQ(bits=3, group_size=32), calib)
    assert all(entry["type"] == "awq" for entry in report.quantized.values())
    assert _error(awq, reference, ids) < 0.9 * _error(rtn, reference, ids)
    loaded = ts.load(ts.save(awq, tmp_path / "awq.slim"))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), awq(ids))


def test_awq_then_gptq_runs_and_the_config_is_checked(llama_dir):
    model, calib = _salient(llama_dir)
    report = awq_(model, AWQ(bits=4, group_size=32, then="gptq"), calib)
    assert {entry["method"] for entry in report.quantized.values()} == {"gptq"}
    with pytest.raises(ConfigError, match=r"AWQ.then = 'fast' is invalid: expected one of 'rtn', 'gptq'"):
        AWQ(then="fast")
    with pytest.raises(ConfigError, match="needs one list of same-class blocks"):
        awq_scale_(torch.nn.Sequential(torch.nn.Linear(4, 4)), AWQ(), torch.randn(2, 4))


def test_awq_runs_through_quantize_and_in_a_recipe_method_list(llama_dir):
    from torchslim.pipeline.recipe import methods

    assert "awq" in methods()["quantize"]
    model, calib = _salient(llama_dir)
    reference, _ = _salient(llama_dir)
    awq_(reference, AWQ(bits=4, group_size=32), calib)
    report = ts.quantize_(model, AWQ(bits=4, group_size=32), calib_inputs=calib)  # AWQ's calibrated handler
    assert all(entry["type"] == "awq" for entry in report.quantized.values())
    ids = torch.cat(calib)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids))
    with pytest.raises(ConfigError, match="overrides = .* is invalid with AWQ"):
        ts.quantize_(_salient(llama_dir)[0], AWQ(), calib_inputs=calib, overrides={"model.model.norm": None})

"""GPTQ block by block: the same Hessians and codes as the whole-model stages, used for block-list models."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize import gptq as gptq_module
from torchslim.quantize.gptq import GPTQ, gptq_
from torchslim.quantize.layers import IntQuantLayer


def _llama(layers: int = 3) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _batches() -> list[tuple[torch.Tensor, ...]]:
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # a padded row: the mask reaches every block
    return [(ids[:3], mask[:3]), (ids[3:], mask[3:])]


def _recording_hessians(monkeypatch) -> dict[int, list[torch.Tensor]]:
    """Record the Hessians each group of layers (one input) is quantized with, in the quantize order."""
    seen: list[list[torch.Tensor]] = []
    original = gptq_module._quantize_modules

    def record(modules, hessians, config):
        seen.append([h.clone() for h in hessians])
        return original(modules, hessians, config)

    monkeypatch.setattr(gptq_module, "_quantize_modules", record)
    return seen


def test_blocks_match_staged_hessians_codes_and_outputs(monkeypatch):
    model = _llama()
    batches = _batches()
    blocks, staged = copy.deepcopy(model), copy.deepcopy(model)
    seen = _recording_hessians(monkeypatch)
    report = gptq_(blocks, GPTQ(bits=4, group_size=32), batches)  # auto: the decoder layers are a block list
    by_blocks = list(seen)
    seen.clear()
    staged_report = gptq_(staged, GPTQ(bits=4, group_size=32), batches, loop="staged")
    assert {row["loop"] for row in report.quantized.values()} == {"blocks"}
    assert {row["loop"] for row in staged_report.quantized.values()} == {"staged"}
    assert list(report.quantized) == list(staged_report.quantized)  # same layers, same order (lm_head last)
    assert report.quantized["lm_head"]["method"] == "gptq"
    assert len(by_blocks) == len(seen) == 3 * 4 + 1  # per block q/k/v, o, gate/up, down; then lm_head
    for mine, theirs in zip(by_blocks, seen, strict=True):
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(blocks.named_modules(), staged.named_modules(), strict=True):
        if isinstance(a, IntQuantLayer):
            assert torch.equal(a.packed, b.packed), name
    ids, mask = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(blocks(ids, mask).logits, staged(ids, mask).logits)
        assert not torch.equal(blocks(ids, mask).logits, model(ids, mask).logits)


def test_hf_model_uses_blocks_and_restores_cache_setting(tmp_path):
    _llama(2).save_pretrained(tmp_path / "llama")
    model = ts.load_hf(tmp_path / "llama")
    model.config.use_cache = True
    ids, mask = _batches()[0]
    report = gptq_(model, GPTQ(bits=4, group_size=32), [(ids, mask)])
    assert {row["loop"] for row in report.quantized.values()} == {"blocks"}
    assert model.config.use_cache is True
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # every Linear, lm_head included
    path = ts.save(model, tmp_path / "q.slim")
    with torch.no_grad():
        assert torch.equal(ts.load(path)(ids, mask), model(ids, mask))


def test_all_layers_of_a_block_at_once():
    model = _llama(2)
    report = gptq_(model, GPTQ(bits=4, group_size=32, true_sequential=False), _batches())
    assert {(row["method"], row["loop"]) for row in report.quantized.values()} == {("gptq", "blocks")}
    assert len(report.quantized) == 2 * 7 + 1


class _Stack(nn.Module):
    """A block list with a layer to quantize before it (falls back to stages) or none (a plain MLP)."""

    def __init__(self, front: bool):
        super().__init__()
        self.front = nn.Linear(8, 8) if front else nn.Identity()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.front(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_generic_block_list_and_fallback_to_stages():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    plain = _Stack(front=False)
    staged = copy.deepcopy(plain)
    report = gptq_(plain, GPTQ(bits=4, group_size=8), x)
    gptq_(staged, GPTQ(bits=4, group_size=8), x, loop="staged")
    assert {row["loop"] for row in report.quantized.values()} == {"blocks"}
    assert torch.equal(plain(x), staged(x))
    front = _Stack(front=True)
    report = gptq_(front, GPTQ(bits=4, group_size=8), x)
    assert {row["loop"] for row in report.quantized.values()} == {"staged"}


def test_blocks_refused_with_the_reason_and_nothing_changed():
    with pytest.raises(ConfigError, match=r"loop = 'blocks' is invalid for _Stack: a layer to quantize .*before"):
        gptq_(_Stack(front=True), GPTQ(), torch.randn(4, 8), loop="blocks")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="no single list of same-class blocks"):
        gptq_(model, GPTQ(), torch.randn(4, 8), loop="blocks")
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ConfigError, match=r"loop = 'fast' is invalid: expected one of auto, blocks, staged"):
        gptq_(model, GPTQ(), torch.randn(4, 8), loop="fast")


def test_blocks_report_one_line_per_block_and_the_same_codes(capsys):
    silent, reported = _llama(2), _llama(2)
    gptq_(silent, GPTQ(bits=4, group_size=32), _batches(), loop="blocks")
    assert capsys.readouterr().err == ""  # the library is silent by default
    gptq_(reported, GPTQ(bits=4, group_size=32), _batches(), loop="blocks", progress="lines")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "gptq blocks: block 1/2: 7 layers quantized", "gptq blocks: block 2/2: 7 layers quantized"]
    assert "ETA" in lines[0] and "ETA" not in lines[1]
    for a, b in zip(silent.state_dict().values(), reported.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_each_float_layer_is_freed_once_its_block_is_quantized(monkeypatch):
    # the float layers' memory must go while GPTQ runs (a mode dict once kept every original layer to the end)
    import gc
    import weakref

    model = _llama(layers=3)
    first_block = [weakref.ref(m) for m in model.model.layers[0].modules() if isinstance(m, nn.Linear)]
    alive_in_last_block: list[int] = []
    original = gptq_module._quantize_modules

    def watch(modules, hessians, config):
        if modules[0] in set(model.model.layers[2].modules()):
            gc.collect()
            alive_in_last_block.append(sum(ref() is not None for ref in first_block))
        return original(modules, hessians, config)

    monkeypatch.setattr(gptq_module, "_quantize_modules", watch)
    gptq_(model, GPTQ(bits=4, group_size=32), _batches())
    assert len(first_block) == 7 and alive_in_last_block and alive_in_last_block == [0] * len(alive_in_last_block)

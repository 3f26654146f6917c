"""``ts.load_hf(DIR, lazy=True)``: decoder blocks stay in their file until needed; GPTQ and RTN read one at a time."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import torchslim as ts
from torchslim import onload
from torchslim.errors import ModelError

IDS = torch.tensor([[2, 5, 7, 9, 3, 4], [1, 3, 5, 7, 9, 2]])


def _meta_blocks(model) -> list[bool]:
    """For each decoder block: whether its weights are still in the file."""
    return [all(p.device.type == "meta" for p in block.parameters()) for block in model.model.model.layers]


@pytest.fixture
def deep_llama_dir(tmp_path):
    """A tiny Llama with 4 blocks and tied embeddings, saved in two shards."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    return tmp_path / "llama"


def test_lazy_load_keeps_blocks_in_the_file_until_they_run(deep_llama_dir, llama_dir):
    whole = ts.load_hf(deep_llama_dir)
    lazy = ts.load_hf(deep_llama_dir, lazy=True)
    assert _meta_blocks(lazy) == [True] * 4
    assert onload.onloader_of(lazy.model) is onload.onloader_of(lazy) is not None  # wrapper or transformers model
    hf = lazy.model
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight  # tied, and read
    assert hf.model.embed_tokens.weight.device.type == "cpu"
    assert torch.equal(lazy(IDS), whole(IDS))  # each block read on its first run
    assert _meta_blocks(lazy) == [False] * 4 and onload.onloader_of(lazy) is None
    assert torch.equal(ts.load_hf(llama_dir, lazy=True)(IDS[:, :4]), ts.load_hf(llama_dir)(IDS[:, :4]))


def test_saving_a_lazy_model_reads_its_blocks_first(deep_llama_dir, tmp_path):
    whole = ts.save(ts.load_hf(deep_llama_dir), tmp_path / "whole.slim").read_bytes()
    assert ts.save(ts.load_hf(deep_llama_dir, lazy=True), tmp_path / "lazy.slim").read_bytes() == whole


def test_streaming_holds_one_block_at_a_time(deep_llama_dir):
    lazy = ts.load_hf(deep_llama_dir, lazy=True)
    loader = onload.onloader_of(lazy)
    seen = []
    for block in lazy.model.model.layers:
        block.register_forward_hook(lambda *args: seen.append(_meta_blocks(lazy).count(False)))
    with loader.streaming():
        out = lazy(IDS)
    assert seen == [1, 1, 1, 1] and _meta_blocks(lazy) == [True] * 4
    assert torch.equal(out, ts.load_hf(deep_llama_dir)(IDS))
    loader.load(lazy.model.model.layers[0])  # loaded for good before a pass: the pass leaves it loaded
    with loader.streaming():
        lazy(IDS)
    assert _meta_blocks(lazy) == [False, True, True, True]


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantizing_a_lazy_model_gives_the_same_model_reading_one_block_at_a_time(deep_llama_dir, tmp_path, method):
    config = ts.GPTQ(bits=4, group_size=16) if method == "gptq" else ts.IntQuant(bits=4, granularity="group",
                                                                               group_size=16)
    calib = [(torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    results = []
    for lazy in (False, True):
        model = ts.load_hf(deep_llama_dir, lazy=lazy)
        first = weakref.ref(model.model.model.layers[0].self_attn.q_proj)
        loaded: list[int] = []  # float block Linear layers in memory whenever a layer is replaced
        freed: list[bool] = []

        def spy(model_, name, new, model=model, loaded=loaded, original=ts.quantize.api._replace, first=first,
                freed=freed):
            loaded.append(sum(1 for block in model.model.model.layers for m in block.modules()
                              if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu"))
            if ".layers.3." in name:  # the last block: the first block's replaced float layer is long gone
                gc.collect()
                freed.append(first() is None)
            return original(model_, name, new)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ts.quantize.api, "_replace", spy)
            if method == "gptq":
                patch.setattr(ts.quantize.gptq, "_replace", spy)
                ts.gptq_(model, config, calib)
            else:
                ts.quantize_(model, config)
        if lazy:  # never more than one block's float Linear layers (7 per block) at once
            assert max(loaded) <= 7, loaded
            assert freed and all(freed)  # replaced float layers are freed as the loop goes (no reference kept)
        results.append((model(IDS), ts.save(model, tmp_path / f"{method}-{lazy}.slim").read_bytes()))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]  # the same file, byte for byte


def test_lazy_falls_back_to_a_whole_load_where_names_do_not_map(gpt2_dir):
    lazy = ts.load_hf(gpt2_dir, lazy=True)  # GPT-2's Conv1D layers become Linear after loading: not lazy
    assert onload.onloader_of(lazy) is None
    assert all(p.device.type == "cpu" for p in lazy.parameters())


def test_a_block_that_does_not_match_its_file_is_a_clear_error(deep_llama_dir):
    lazy = ts.load_hf(deep_llama_dir, lazy=True)
    loader = onload.onloader_of(lazy)
    block = lazy.model.model.layers[0]
    source = loader._sources[block][0]
    source.module._parameters[source.name] = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    with pytest.raises(ModelError, match=r"the file holds shape .* the model expects \(3, 3\)"):
        lazy(IDS)

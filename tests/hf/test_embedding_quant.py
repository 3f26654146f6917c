"""Embedding quantization with tied weights kept tied: a lookup decodes only its rows, an embedding and the lm_head
tied to it share one set of codes, and the .slim file stores a shared tensor once (and ties it again at load)."""

import pytest
import torch
import transformers
from torch import nn

import torchslim as ts
from torchslim.artifact import read_manifest
from torchslim.quantize.layers import IntQuantLayer

VOCAB, HIDDEN = 2000, 64


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    """A tiny Llama whose lm_head is tied to its 2000-row embedding (the embedding is most of its weights)."""
    directory = tmp_path_factory.mktemp("tied-llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config", [
    ts.IntQuant(bits=4, granularity="group", group_size=32, embeddings=True),
    ts.IntQuant(bits=8, granularity="channel", symmetric=True, embeddings=True),
    ts.IntQuant(bits=3, granularity="group", group_size=48, embeddings=True),  # rows of 3 x 48 x 3 bits: bytes
    ts.IntQuant(bits=3, granularity="channel", embeddings=True),  # 64 x 3 bits a row: not whole bytes
], ids=["int4-g32", "int8-sym", "int3-g48", "int3-channel"])
def test_a_lookup_equals_the_dequantized_table(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 66), nn.Linear(66, 4))
    ts.quantize_(model, config)
    layer = model[0]
    assert isinstance(layer, IntQuantLayer) and layer.op == "embedding" and layer.embedding_dim == 66
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    expected = nn.functional.embedding(ids, layer.dequantize_weight())
    torch.testing.assert_close(layer(ids), expected)
    assert (layer.dequantize_weight() - model[0].weight).abs().max() == 0  # the weight property agrees


def test_tied_embedding_and_lm_head_share_codes_and_the_file_stores_them_once(tied_llama_dir, tmp_path):
    ids = torch.tensor([[1, 5, 9, 1999, 42, 7]])
    plain = ts.load_hf(tied_llama_dir)
    with torch.inference_mode():
        fp32 = plain(ids)
    fp32_file = ts.save(plain, tmp_path / "fp32.slim")
    head_only = ts.load_hf(tied_llama_dir)
    ts.quantize_(head_only, ts.IntQuant(bits=4, granularity="group", group_size=32))
    head_only_file = ts.save(head_only, tmp_path / "head-only.slim")

    model = ts.load_hf(tied_llama_dir)
    report = ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32, embeddings=True))
    embed, head = model.model.model.embed_tokens, model.model.lm_head
    assert "model.model.embed_tokens" in report.quantized and "model.lm_head" in report.quantized
    assert embed.packed is head.packed and embed.scale is head.scale and embed.zero_point is head.zero_point
    with torch.inference_mode():
        quantized = model(ids)
    assert nn.functional.cosine_similarity(quantized.flatten(), fp32.flatten(), dim=0) > 0.95  # random weights

    path = ts.save(model, tmp_path / "int4.slim")
    table_bytes = VOCAB * HIDDEN * 4
    # the fp32 file held the tied table once too (an alias), the head-only int4 file kept it in fp32
    assert fp32_file.stat().st_size < 1.5 * table_bytes + 300_000
    assert path.stat().st_size < head_only_file.stat().st_size - 0.8 * table_bytes
    assert path.stat().st_size < 0.2 * fp32_file.stat().st_size
    manifest = read_manifest(path)
    assert manifest["format_version"] == 2
    assert manifest["tensors"]["model.lm_head.packed"] == {
        "encoding": "alias", "alias_of": "model.model.embed_tokens.packed", "dtype": "uint8",
        "shape": list(embed.packed.shape), "stored": []}

    loaded = ts.load(path)
    embed, head = loaded.model.model.embed_tokens, loaded.model.lm_head
    assert embed.packed is head.packed and embed.scale is head.scale  # tied again in memory
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), quantized)
        tokens = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 10)


class TiedPair(nn.Module):
    """An embedding and a head sharing one weight (``tie=False`` builds them apart)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(300, 32), nn.Linear(32, 300, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_a_tied_fp32_pair_is_stored_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    model = TiedPair()
    # the factory builds the pair untied, so only the file's alias entry can tie it again
    path = ts.save(model, tmp_path / "tied.slim", factory={"name": f"{__name__}:TiedPair", "kwargs": {"tie": False}})
    assert path.stat().st_size < 300 * 32 * 4 * 1.5
    loaded = ts.load(path, trust_factory=True)
    assert loaded.head.weight is loaded.embed.weight
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight)


def test_the_cli_quantizes_embeddings_when_asked(tied_llama_dir, tmp_path, capsys):
    import json

    from torchslim.cli.main import main

    sizes = {}
    for flag in ([], ["--embeddings"]):
        out = tmp_path / f"q{len(flag)}.slim"
        args = ["quantize", f"hf:{tied_llama_dir}", "--granularity", "group", "--group-size", "32", *flag,
                "--out", str(out), "--json"]
        assert main(args) == 0, capsys.readouterr().err
        sizes[bool(flag)] = json.loads(capsys.readouterr().out)["output_bytes"]
    assert sizes[True] < sizes[False] - 0.8 * VOCAB * HIDDEN * 4  # the fp32 table became 4-bit codes
    loaded = ts.load(tmp_path / "q1.slim")
    assert loaded.model.model.embed_tokens.packed is loaded.model.lm_head.packed

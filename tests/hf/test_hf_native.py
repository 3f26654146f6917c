"""A loaded hf model works where the transformers model did: keyword calls, generate, pipelines, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import torchslim as ts
from torchslim.cli.main import main
from torchslim.hf import encode

from .conftest import TEXTS


def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with torchslim's own tensor forward (no cache): the reference for generate()."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def test_keyword_calls_return_the_transformers_output(bert_dir):
    model = ts.load_hf(bert_dir)
    batch = model.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    assert "token_type_ids" in batch
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        tensor = model(batch["input_ids"], batch["attention_mask"])
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert torch.equal(out.last_hidden_state, tensor) and len(out.hidden_states) == 3
    assert model.get_input_embeddings() is model.model.embeddings.word_embeddings and model.device.type == "cpu"


def test_positional_calls_need_one_or_two_inputs(bert_dir):
    model = ts.load_hf(bert_dir)
    with pytest.raises(TypeError, match=r"got 3 positional argument\(s\)"):
        model(torch.ones(1, 4, dtype=torch.long), None, None)


@pytest.mark.parametrize(("family", "change"), [("llama", "int4"), ("gpt2", "pruned")])
def test_generate_and_pipeline_match_own_forward_after_compression_and_reload(request, tmp_path, family, change):
    model = ts.load_hf(request.getfixturevalue(f"{family}_dir"))
    if change == "int4":
        ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32))
    else:
        ts.prune_transformer_(model, ts.ChannelPruning(amount=0.5))
    loaded = ts.load(ts.save(model, tmp_path / f"{change}.slim"))
    prompt = loaded.tokenizer("the cat sat on", return_tensors="pt")
    expected = _greedy(loaded, prompt["input_ids"], 6)
    assert torch.equal(_greedy(model, prompt["input_ids"], 6), expected)
    generated = loaded.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)
    pipe = transformers.pipeline("text-generation", model=loaded, tokenizer=loaded.tokenizer)
    tokens = pipe("the cat sat on", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(tokens) == expected[0].tolist()
    loss = loaded(**prompt, labels=prompt["input_ids"]).loss
    assert torch.isfinite(loss)


def test_cli_quantizes_a_pruned_hf_slim(bert_dir, tmp_path, texts_file, capsys):
    pruned = tmp_path / "pruned.slim"
    assert main(["prune", f"hf:{bert_dir}", "--structured", "--amount", "0.5", "--out", str(pruned)]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned-int8.slim"
    assert main(["quantize", str(pruned), "--bits", "8", "--text", str(texts_file), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cosine"] > 0.99 and summary["output_bytes"] < 0.5 * pruned.stat().st_size
    model = ts.load(out)
    ids, mask = encode(model, TEXTS)
    assert model(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (len(TEXTS), ids.shape[1], 64)
    assert model.model.encoder.layer[0].intermediate.dense.weight_shape == [64, 64]  # pruned 128 -> 64, then int8


def test_a_quantized_encoder_serves_inside_sentence_transformers(bert_dir):
    import sentence_transformers
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = ts.load_hf(bert_dir)
    ts.quantize_(model, ts.IntQuant(bits=8))
    encoder = Transformer(str(bert_dir))
    encoder.auto_model = model  # the module sentence-transformers calls with keyword inputs
    st = sentence_transformers.SentenceTransformer(modules=[encoder, Pooling(64, "mean")], device="cpu")
    texts = TEXTS[:3]
    embeddings = st.encode(texts, convert_to_tensor=True)
    ids, mask = encode(model, texts)
    with torch.no_grad():
        hidden = model(ids, mask)
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.nn.functional.cosine_similarity(embeddings, expected).min() > 0.9999

"""Perplexity by sliding window: hand-computable cases, every token after the first scored once, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli.main import main
from torchslim.errors import ConfigError, DataError, ModelError


class _Constant(nn.Module):
    """Equal logits for every token: each token has probability 1 / vocab, so perplexity = vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


class _Bigram(nn.Module):
    """Logits from the current token only: the scored result does not depend on how much context a window has."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.table[ids]


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 8), (8, 3), (5, 1), (64, 32)])
def test_constant_logits_give_the_vocabulary_size(seq_len, stride):
    ids = torch.arange(40) % 7
    result = ts.perplexity(_Constant(11), ids, seq_len=seq_len, stride=stride)
    assert result.perplexity == pytest.approx(11.0, rel=1e-6)
    assert result.windows == (1 if seq_len >= 40 else math.ceil((40 - seq_len) / stride) + 1)
    # every token but the first, once; disjoint windows cannot score their first token (no context)
    assert result.tokens == (40 - result.windows if stride == seq_len else 39)


@pytest.mark.parametrize(("seq_len", "stride"), [(6, 6), (6, 2), (40, 20)])
def test_each_new_token_is_scored_once_with_its_context(seq_len, stride):
    model = _Bigram(7)
    ids = torch.randint(0, 7, (33,), generator=torch.Generator().manual_seed(1))
    log_probs = torch.log_softmax(model.table.detach(), dim=-1)
    # disjoint windows do not score their first token (t = 6, 12, ...); otherwise every t >= 1
    scored = [t for t in range(1, 33) if stride < seq_len or t % seq_len]
    expected = -float(sum(log_probs[ids[t - 1], ids[t]] for t in scored)) / len(scored)
    result = ts.perplexity(model, ids.unsqueeze(0), seq_len=seq_len, stride=stride)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match=r"stride = 9 is invalid: expected an integer in \[1, seq_len = 8\]"):
        ts.perplexity(_Constant(3), torch.arange(10), seq_len=8, stride=9)
    with pytest.raises(ConfigError, match="seq_len = 1 is invalid"):
        ts.perplexity(_Constant(3), torch.arange(10), seq_len=1)
    with pytest.raises(DataError, match=r"shape \(2, 5\)"):
        ts.perplexity(_Constant(3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DataError, match="1 token"):
        ts.perplexity(_Constant(3), torch.arange(1))
    with pytest.raises(ModelError, match="no tokenizer"):
        ts.perplexity(_Constant(3), ["some text"])


def test_texts_through_the_tokenizer_and_the_cli(gpt2_dir, texts_file, tmp_path, capsys):
    model = ts.load_hf(gpt2_dir)
    from_texts = ts.perplexity(model, ["the cat sat", "a dog ran"], seq_len=4, stride=2)
    ids = model.tokenizer("the cat sat\n\na dog ran", return_tensors="pt")["input_ids"]
    assert from_texts == ts.perplexity(model, ids, seq_len=4, stride=2)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32))
    path = ts.save(model, tmp_path / "q.slim")
    code = main(["eval", str(path), "--text", str(texts_file), "--perplexity", "--seq-len", "16", "--stride", "8",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    lines = texts_file.read_text().split("\n")
    expected = ts.perplexity(ts.load(path), model.tokenizer("\n".join(x for x in lines if x.strip()),
                                                            return_tensors="pt")["input_ids"], seq_len=16, stride=8)
    assert out["perplexity"] == pytest.approx(expected.perplexity) and out["tokens"] == expected.tokens
    assert out["bytes"] == path.stat().st_size
    assert main(["eval", f"hf:{gpt2_dir}", "--perplexity"]) == 2
    assert "--perplexity needs --text" in capsys.readouterr().err

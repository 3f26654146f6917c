"""Tiny random BERT and GPT-2 model directories with locally built tokenizers (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree and with under over".split()
TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast under the tree",
    "the big red house",
    "a small blue cat sat with the dog",
    "the dog ran over the mat and the cat sat",
    "big tree",
    "the slow dog and the fast cat ran under a big red tree",
    "a cat",
]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    import transformers
    directory = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab=str(directory / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _word_tokenizer(transformers, tokenizers):
    """A word-level tokenizer over WORDS whose end-of-text token (id 0) also pads: ``(vocab, tokenizer)``."""
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )
    return vocab, tokenizer


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    import tokenizers
    import transformers
    directory = tmp_path_factory.mktemp("gpt2")
    vocab, tokenizer = _word_tokenizer(transformers, tokenizers)
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (grouped-query attention) with the word-level tokenizer."""
    import tokenizers
    import transformers
    directory = tmp_path_factory.mktemp("llama")
    vocab, tokenizer = _word_tokenizer(transformers, tokenizers)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

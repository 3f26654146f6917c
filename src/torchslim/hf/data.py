"""Unlabelled text as training data for distillation: token windows without padding.

Every text is tokenized with the model's tokenizer (special tokens included), the token streams are joined and
cut into windows of ``seq_len`` tokens; the last window is completed with tokens from the start, so no window
holds padding and no attention mask is needed (the student and teacher see exactly the same tokens). The
dataset's targets are float zeros: :func:`torchslim.distill.distill` then has no labels, so use ``KD(alpha=1.0)``
(the student learns the teacher's outputs only).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.errors import ConfigError, DataError, ModelError

__all__ = ["text_dataset"]


def text_dataset(model: nn.Module, texts: list[str], *, seq_len: int = 128, max_windows: int | None = None
                 ) -> TensorDataset:
    """Token windows of ``texts`` for distillation on unlabelled text.

    Args:
        model: an :class:`~torchslim.hf.loading.HFModel` with a tokenizer (the teacher or the student: they share
            the vocabulary).
        texts: the strings (e.g. :func:`~torchslim.hf.fidelity.read_texts` of a file).
        seq_len: tokens per window (>= 2, at most the model's ``max_position_embeddings``).
        max_windows: keep at most this many windows (the first ones).

    Returns:
        ``TensorDataset(input_ids (N, seq_len) int64, targets (N,) float32 zeros)``; with fewer tokens than
        ``seq_len`` in all, one window of all the tokens.

    Raises:
        ConfigError: a bad ``seq_len`` or ``max_windows``.
        DataError: no texts, or texts that give no tokens.
        ModelError: the model has no tokenizer.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len = {seq_len!r} is invalid: expected an integer >= 2")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"seq_len = {seq_len} is invalid: expected at most {limit} (max_position_embeddings)")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ConfigError(f"max_windows = {max_windows!r} is invalid: expected an integer >= 1 or None")
    if not texts:
        raise DataError("text_dataset: no texts: expected at least one")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ModelError(
            f"hf model {getattr(model, 'source', '?')!r} has no tokenizer: save one in the model directory "
            "(tokenizer.save_pretrained(DIR))"
        )
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]:
        stream.extend(int(i) for i in ids)
    if not stream:
        raise DataError("text_dataset: the texts give no tokens")
    if len(stream) <= seq_len:
        windows = torch.tensor([stream], dtype=torch.long)
    else:
        count = -(-len(stream) // seq_len)
        stream = (stream * 2)[: count * seq_len]  # the last window wraps around to the first tokens
        windows = torch.tensor(stream, dtype=torch.long).view(count, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    return TensorDataset(windows, torch.zeros(windows.shape[0]))

"""Perplexity of a causal language model on a text, by a sliding window (Hugging Face's perplexity guide).

The text is one token stream. Windows of ``seq_len`` tokens start every ``stride`` tokens; each window scores
only its *new* tokens (those after the previous window's end), each predicted from everything before it inside
the window, so with ``stride < seq_len`` every token but the first is scored exactly once, with at least
``seq_len - stride`` tokens of context (except near the start). ``stride = seq_len`` gives disjoint windows
(fastest, least context), whose first token has no context and is not scored (as in the guide, whose loss shifts
the labels inside each window). Perplexity = ``exp(sum of negative log-likelihoods / scored tokens)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim._utils import device_of, eval_mode, logits_of
from torchslim.errors import ConfigError, DataError, ModelError

__all__ = ["Perplexity", "perplexity", "token_stream"]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """A perplexity measurement.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token (nats).
        tokens: tokens scored (the stream's length minus one; minus one per window when ``stride = seq_len``).
        windows: forward passes run.
        seq_len: window length.
        stride: window step.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict."""
        return dataclasses.asdict(self)


def token_stream(model: nn.Module, texts: Sequence[str], *, separator: str = "\n\n") -> Tensor:
    """The texts joined by ``separator`` and tokenized by the model's tokenizer, as one 1-D int64 stream.

    Raises:
        ModelError: the model has no tokenizer.
        DataError: no texts, or no tokens.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ModelError(
            f"perplexity: {type(model).__name__} has no tokenizer: pass token ids, or load the model from a "
            "directory that holds one"
        )
    if not texts:
        raise DataError("perplexity: no texts: expected at least one")
    ids = tokenizer(separator.join(texts), return_tensors="pt")["input_ids"].reshape(-1).long()
    if ids.numel() < 2:
        raise DataError(f"perplexity: the texts give {ids.numel()} token(s): expected at least 2")
    return ids


def _check_window(seq_len: Any, stride: Any, limit: Any) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len = {seq_len!r} is invalid: expected an integer >= 2")
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"seq_len = {seq_len} is invalid: expected at most {limit} (max_position_embeddings)")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise ConfigError(f"stride = {stride!r} is invalid: expected an integer in [1, seq_len = {seq_len}]")


def perplexity(
    model: nn.Module,
    data: Sequence[str] | Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> Perplexity:
    """Perplexity of a causal language model on texts or a token stream (sliding window; see the module doc).

    Args:
        model: a model whose ``model(input_ids)`` returns logits ``(1, tokens, vocab)`` (a tensor, or an output
            with ``.logits``): an ``HFModel``, a loaded ``.slim``, or a ``transformers`` causal LM.
        data: strings (joined by a blank line and tokenized by ``model.tokenizer``) or token ids (1-D, or
            ``(1, N)``).
        seq_len: tokens per window (at most the model's ``max_position_embeddings``).
        stride: window step in ``[1, seq_len]``; default ``seq_len // 2``.
        max_tokens: use only the first this many tokens of the stream.

    Returns:
        A :class:`Perplexity`.

    Raises:
        ConfigError: a bad ``seq_len``, ``stride`` or ``max_tokens``.
        DataError: fewer than 2 tokens, or token ids that are not one sequence of integers.
        ModelError: no tokenizer for texts, or the model does not return logits of one row per token.
    """
    config = getattr(model, "config", None)
    stride = max(1, seq_len // 2) if stride is None and isinstance(seq_len, int) else stride
    _check_window(seq_len, stride, getattr(config, "max_position_embeddings", None))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise ConfigError(f"max_tokens = {max_tokens!r} is invalid: expected an integer >= 2 or None")
    if isinstance(data, Tensor):
        if data.is_floating_point() or data.dim() > 2 or (data.dim() == 2 and data.shape[0] != 1):
            raise DataError(
                f"perplexity: token ids of shape {tuple(data.shape)} and dtype {data.dtype} are invalid: expected "
                "integer ids of shape (N,) or (1, N)"
            )
        ids = data.reshape(-1).long()
    else:
        ids = token_stream(model, list(data))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise DataError(f"perplexity: {ids.numel()} token(s): expected at least 2")
    device = device_of(model)
    total, scored, windows, done = 0.0, 0, 0, 1  # done: tokens [0, done) are scored (token 0 never is)
    with eval_mode(model), torch.no_grad():
        for begin in range(0, ids.numel(), stride):
            end = min(begin + seq_len, ids.numel())
            window = ids[begin:end].unsqueeze(0).to(device)
            logits = logits_of(model(window), "perplexity")
            if logits.dim() != 3 or logits.shape[:2] != window.shape:
                raise ModelError(
                    f"perplexity: the model returns shape {tuple(logits.shape)} for {tuple(window.shape)} token "
                    "ids: expected logits (1, tokens, vocab)"
                )
            first = max(done, begin + 1)  # new tokens of this window, each predicted by the position before
            predicted = logits[0, first - 1 - begin : end - 1 - begin].float()
            total += float(F.cross_entropy(predicted, window[0, first - begin :], reduction="sum"))
            scored += end - first
            windows += 1
            done = end
            if end == ids.numel():
                break
    nll = total / scored
    return Perplexity(math.exp(nll), nll, scored, windows, seq_len, stride)

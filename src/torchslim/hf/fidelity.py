"""Fidelity of a compressed language model to its original, on unlabelled text (no labels needed).

For each text (one line of a file) both models run on the same tokens; compared are

- ``cosine``: mean cosine similarity of the outputs: per token of the logits of a model with a head (padding
  excluded), per text of mean-pooled embeddings (last hidden state) of a base model;
- ``top1_agreement``: fraction of those tokens (or texts, for a classifier) whose arg-max agrees; None for
  embeddings, which have no classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim._utils import eval_mode, logits_of
from torchslim.errors import DataError, ModelError
from torchslim.hf.loading import HF_PREFIX, encode, load_hf
from torchslim.models.registry import factory_of

__all__ = ["read_texts", "reference_model", "text_fidelity"]


def read_texts(path: str | os.PathLike, *, limit: int | None = None) -> list[str]:
    """Read one text per non-empty line of a UTF-8 file.

    Args:
        path: the text file.
        limit: keep at most this many lines.

    Returns:
        The stripped lines.

    Raises:
        DataError: the file is missing, not UTF-8, or has no non-empty line.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"--text {str(path)!r}: no such file: expected a text file, one sentence per line") from exc
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise DataError(f"--text {str(path)!r}: cannot read it as UTF-8 text ({exc})") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"--text {str(path)!r} holds no text: expected one sentence or paragraph per line")
    return texts[:limit] if limit else texts


def reference_model(model: nn.Module) -> nn.Module:
    """The original (uncompressed) Hugging Face model a compressed one was made from.

    Args:
        model: a model loaded from ``hf:DIR`` or a ``.slim`` file whose factory (or, for an int8 ONNX graph,
            source factory) is ``hf:DIR``.

    Returns:
        ``load_hf(DIR)`` with the directory's own weights.

    Raises:
        ModelError: the model was not made from a Hugging Face directory.
    """
    factory = factory_of(model) or {}
    if not str(factory.get("name", "")).startswith(HF_PREFIX):
        factory = getattr(model, "source_factory", None) or {}
    name = str(factory.get("name", ""))
    if not name.startswith(HF_PREFIX):
        raise ModelError(
            f"text fidelity needs a model made from a Hugging Face directory (factory 'hf:DIR'), got factory "
            f"{name or None!r}"
        )
    return load_hf(name[len(HF_PREFIX):], architecture=(factory.get("kwargs") or {}).get("architecture"))


def text_fidelity(
    model: nn.Module,
    reference: nn.Module,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    tokenizer_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Compare ``model`` with ``reference`` on ``texts`` (see the module docstring).

    Args:
        model: the compressed model (``HFModel``, or an ``OnnxGraph`` taking ``(input_ids, attention_mask)``).
        reference: the original model.
        texts: the samples, one string each.
        max_length: tokens per text at most (longer texts are truncated).
        batch_size: texts per forward.
        tokenizer_model: the model whose tokenizer is used (default: ``reference``, else ``model``).

    Returns:
        ``{"texts", "tokens", "output", "cosine", "top1_agreement"}`` (``output``: ``"logits"`` or
        ``"hidden"``).

    Raises:
        DataError: no texts, or the two models' outputs differ in shape.
        ModelError: neither model has a tokenizer.
    """
    if not texts:
        raise DataError("text_fidelity: no texts: expected at least one")
    holder = tokenizer_model or (reference if getattr(reference, "tokenizer", None) is not None else model)
    kind = getattr(reference, "output", None) or getattr(model, "output", "logits")
    cosines: list[Tensor] = []
    agreements: list[Tensor] = []
    tokens = 0
    with eval_mode(model, reference), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode(holder, texts[start : start + batch_size], max_length=max_length)
            got = logits_of(model(ids, mask), "text_fidelity: the model").float()
            want = logits_of(reference(ids, mask), "text_fidelity: the reference").float()
            if got.shape != want.shape:
                raise DataError(
                    f"text_fidelity: the model returns shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
                )
            keep = mask.bool()
            tokens += int(keep.sum())
            if kind == "hidden" and got.dim() == 3:
                weights = keep.unsqueeze(-1).float()
                pooled_got = (got * weights).sum(1) / weights.sum(1).clamp(min=1)
                pooled_want = (want * weights).sum(1) / weights.sum(1).clamp(min=1)
                cosines.append(F.cosine_similarity(pooled_got, pooled_want, dim=-1))
                continue
            if got.dim() == 3:  # per-token logits: padding positions are left out
                got, want = got[keep], want[keep]
            cosines.append(F.cosine_similarity(got, want, dim=-1))
            agreements.append((got.argmax(-1) == want.argmax(-1)).float())
    return {
        "texts": len(texts),
        "tokens": tokens,
        "output": kind,
        "cosine": float(torch.cat(cosines).mean()),
        "top1_agreement": float(torch.cat(agreements).mean()) if agreements else None,
    }

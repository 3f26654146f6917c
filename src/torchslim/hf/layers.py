"""Shallower transformers: drop whole layers (DistilBERT-style students) and map them back to the teacher.

:func:`~torchslim.hf.loading.drop_layers` (beside ``HFModel``, which it copies) keeps only some of a model's
transformer blocks (every other one, or a chosen list), using the helpers here; the kept blocks keep the teacher's
weights, the usual initialisation of a layer-dropped student (DistilBERT takes every other layer of BERT). The
config's ``num_hidden_layers`` is updated and the kept indices are recorded in the factory (``kwargs["layers"]``),
so ``torchslim.save``/``torchslim.load`` rebuild the shallower model.

:func:`hidden_pairs` names the ``KD.features`` pairs that match each student block's output to the teacher block
whose output the student's next block expects as input (TinyBERT's uniform mapping for every-other layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from torchslim.errors import ConfigError, ModelError
from torchslim.models.registry import factory_of

__all__ = ["hidden_pairs", "kept_layers", "layer_list", "parse_keep", "set_dropout_"]


def _depth(config: Any) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks of a Hugging Face model.

    Args:
        model: an :class:`~torchslim.hf.loading.HFModel` (or a module with a ``config``).

    Returns:
        ``(name, module_list)``: the ``nn.ModuleList`` with ``config.num_hidden_layers`` blocks of one class
        (``model.encoder.layer`` for BERT, ``model.transformer.h`` for GPT-2, ``model.model.layers`` for Llama).

    Raises:
        ModelError: no config, or not exactly one such list (encoder-decoder models have two).
    """
    depth = _depth(getattr(model, "config", None))
    if depth is None:
        raise ModelError(f"{type(model).__name__} has no config.num_hidden_layers: expected a Hugging Face model")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == depth
        and len({type(block) for block in module}) == 1
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise ModelError(
            f"{type(model).__name__}: expected exactly one list of {depth} transformer layers "
            f"(config.num_hidden_layers), found {names}"
        )
    return found[0]


def parse_keep(keep: str | Sequence[int], depth: int) -> list[int]:
    """The layer indices to keep, checked.

    Args:
        keep: ``"every-other"`` (layers 0, 2, 4, ...), ``"0,2,4"``, or a sequence of indices.
        depth: the number of layers of the model.

    Returns:
        The sorted, distinct indices.

    Raises:
        ConfigError: an unknown word, an index outside ``[0, depth)``, a repeated index, or nothing kept.
    """
    if isinstance(keep, str):
        text = keep.strip()
        if text == "every-other":
            return list(range(0, depth, 2))
        parts = [p.strip() for p in text.split(",")]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise ConfigError(
                f"layers = {keep!r} is invalid: expected 'every-other' or comma-separated layer indices, e.g. 0,2,4"
            )
        keep = [int(p) for p in parts]
    indices = list(keep)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"layers = {keep!r} is invalid: expected at least one integer layer index in [0, {depth})")
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"layers = {list(keep)!r} is invalid: index {bad[0]} is outside [0, {depth})")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"layers = {list(keep)!r} is invalid: expected each layer index at most once")
    return sorted(indices)


def shorten_config_(config: Any, keep: Sequence[int]) -> None:
    """Set ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) of ``config`` to the kept layers."""
    depth = _depth(config)
    for attr in ("layer_types",):
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == depth:
            setattr(config, attr, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)


def shorten_(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the blocks ``keep`` of ``model``'s layer list, in place (config updated, layer indices renumbered)."""
    name, blocks = layer_list(model)
    kept = nn.ModuleList([blocks[i] for i in keep])
    for index, block in enumerate(kept):
        for module in block.modules():  # attention modules index a key/value cache by their layer number
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, kept)
    shorten_config_(model.config, keep)


def kept_layers(model: nn.Module) -> list[int] | None:
    """The teacher's layer indices a layer-dropped model keeps (from its factory), or None when none were dropped."""
    layers = ((factory_of(model) or {}).get("kwargs") or {}).get("layers")
    return None if layers is None else [int(i) for i in layers]


def hidden_pairs(student: nn.Module, teacher: nn.Module) -> tuple[str, ...]:
    """``KD.features`` pairs matching every student layer's output to a teacher layer's output.

    Student layer ``i`` starts from teacher layer ``kept[i]``; its output is what the student's next layer
    reads, so it is matched to the output of teacher layer ``kept[i + 1] - 1`` (the last student layer to the
    last teacher layer). With every other layer of 6 kept (0, 2, 4) the pairs are 1->0, 3->1, 5->2. A student
    with as many layers as the teacher is matched layer by layer.

    Args:
        student: a model made by :func:`drop_layers` (or of equal depth).
        teacher: the original model.

    Returns:
        ``("teacher.layer.name:student.layer.name", ...)``.

    Raises:
        ModelError: the student's depth does not follow from the teacher's and no kept layers are recorded.
    """
    t_name, t_blocks = layer_list(teacher)
    s_name, s_blocks = layer_list(student)
    kept = kept_layers(student)
    teacher_kept = kept_layers(teacher)
    if kept is not None and teacher_kept is not None:  # both shallower than some original: compare positions
        position = {layer: i for i, layer in enumerate(teacher_kept)}
        if not set(kept) <= set(position):
            raise ModelError(f"hidden_pairs: the student keeps layers {kept}, not all in the teacher's {teacher_kept}")
        kept = [position[layer] for layer in kept]
    if kept is None:
        if len(s_blocks) != len(t_blocks):
            raise ModelError(
                f"hidden_pairs: the student has {len(s_blocks)} layers and the teacher {len(t_blocks)}, and the "
                "student records no kept layers: expected a student made by drop_layers"
            )
        kept = list(range(len(t_blocks)))
    targets = [nxt - 1 for nxt in kept[1:]] + [len(t_blocks) - 1]
    return tuple(f"{t_name}.{t}:{s_name}.{i}" for i, t in enumerate(targets))


def set_dropout_(model: nn.Module, p: float = 0.0) -> int:
    """Set the probability of every ``nn.Dropout`` of ``model`` (attention dropout included), in place.

    Distilling on a small unlabelled text set works best without dropout in the student: the teacher's outputs
    are exact targets, and dropout noise is larger than the gap a few layers leave (measured: the output MSE to
    the teacher rose with BERT's default 0.1 and fell 30x with 0). Inference (eval mode) is not affected, and a
    reloaded ``.slim`` has its directory's dropout again.

    Args:
        model: any module.
        p: the new probability in ``[0, 1)``.

    Returns:
        The number of dropout modules changed.

    Raises:
        ConfigError: ``p`` outside ``[0, 1)``.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout = {p!r} is invalid: expected a number in [0, 1)")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
            count += 1
    return count

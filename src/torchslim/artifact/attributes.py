"""Module state that tensors and codecs do not show: head counts, and the shapes of resized modules without a codec.

Structural pruning changes an attention module's ``num_heads`` along with its projections, and shrinks modules of
any class (a ``transformers`` ``ConvNextLayerNorm``, an ``EfficientNetDepthwiseConv2d``: subclasses of built-in
layers with no codec of their own). Modules with a codec are rebuilt from its spec; for the others ``save`` records,
against the model the factory builds:

- ``"attributes"``: ``{module: {name: value}}``, the head counts in :data:`ATTRIBUTES` that differ and, for a module
  whose own tensors changed shape, every int or int-tuple attribute that differs (``normalized_shape``,
  ``in_channels``, ``groups``...);
- ``"shapes"``: ``{module: {tensor: shape}}``, its own parameters and buffers whose shape differs.

``load`` sets them on the rebuilt model before loading the tensors (which then fill the resized ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.errors import ArtifactError

__all__ = ["ATTRIBUTES", "apply_changes_", "module_changes", "register_module_attribute"]

# head counts and widths that head pruning changes (torchslim.prune, torchslim.hf.loading.sync_config_)
ATTRIBUTES: list[str] = ["num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size"]


def register_module_attribute(name: str) -> None:
    """Record the int attribute ``name`` of every module whose value differs from the factory model's.

    Raises:
        ValueError: ``name`` is not an identifier.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name = {name!r} is invalid: expected an attribute name (an identifier)")
    if name not in ATTRIBUTES:
        ATTRIBUTES.append(name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(value: Any) -> int | list[int] | None:
    """``value`` as an int or a list of ints, or None if it is neither."""
    if _is_int(value):
        return value
    if isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        return list(value)
    return None


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}


def module_changes(
    model: nn.Module, reference: nn.Module
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """What ``model`` holds that the factory's model (``reference``, codec replacements done) does not show.

    Returns:
        ``(attributes, shapes)`` as described in the module docstring (only modules present in both).
    """
    references = dict(reference.named_modules())
    attributes: dict[str, dict[str, Any]] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    for name, module in model.named_modules():
        ref = references.get(name)
        if ref is None:
            continue
        ref_tensors = _own_tensors(ref)
        resized = {
            n: list(t.shape)
            for n, t in _own_tensors(module).items()
            if n in ref_tensors and t.shape != ref_tensors[n].shape
        }
        for attr, value in module.__dict__.items():
            plain = _plain(value)
            if plain is None or plain == _plain(ref.__dict__.get(attr)):
                continue
            if (attr in ATTRIBUTES and _is_int(value)) or (resized and attr in ref.__dict__ and attr[0] != "_"):
                attributes.setdefault(name, {})[attr] = plain
        if resized:
            shapes[name] = resized
    return attributes, shapes


def apply_changes_(model: nn.Module, attributes: Any, shapes: Any, where: str) -> None:
    """Set the recorded attributes on the rebuilt ``model`` and give its resized tensors their recorded shapes.

    Raises:
        ArtifactError: a malformed record, or one naming a module, attribute or tensor the model lacks.
    """
    modules = dict(model.named_modules())
    for section, records in (("attributes", attributes), ("shapes", shapes)):
        if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
            raise ArtifactError(f"{where}: manifest {section} = {records!r} is invalid: expected {{module: {{...}}}}")
        missing = [name for name in records if name not in modules]
        if missing:
            raise ArtifactError(
                f"{where}: manifest {section} name module {missing[0]!r}, which the rebuilt model lacks"
            )
    for name, attrs in attributes.items():
        for attr, value in attrs.items():
            _set_attribute(modules[name], name, attr, value, where)
    for name, tensors in shapes.items():
        own = _own_tensors(modules[name])
        for tensor, shape in tensors.items():
            if tensor not in own or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise ArtifactError(
                    f"{where}: manifest shapes[{name!r}][{tensor!r}] = {shape!r} is invalid: expected a list of "
                    f"sizes of one of its tensors ({', '.join(own) or 'none'})"
                )
            _resize_(modules[name], tensor, shape)


def _set_attribute(module: nn.Module, name: str, attr: str, value: Any, where: str) -> None:
    current = module.__dict__.get(attr)
    if attr in ATTRIBUTES and current is None and _is_int(value):
        setattr(module, attr, value)
        return
    if _plain(current) is None or _is_int(current) != _is_int(value) or _plain(value) is None:
        raise ArtifactError(
            f"{where}: manifest attributes[{name!r}][{attr!r}] = {value!r} is invalid: expected an int or a list of "
            f"ints replacing an attribute of that kind (the rebuilt module holds {current!r})"
        )
    setattr(module, attr, value if _is_int(value) else type(current)(value))


def _resize_(module: nn.Module, tensor: str, shape: list[int]) -> None:
    old = _own_tensors(module)[tensor]
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if tensor in module._parameters:
        module._parameters[tensor] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[tensor] = new

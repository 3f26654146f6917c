"""Int attributes of modules that their tensors do not show (attention head counts): recorded by save, set by load.

Structural head pruning changes an attention module's ``num_heads`` along with its projections' shapes. The
projections are rebuilt from their codecs, but a module without a codec of its own (any ``transformers`` attention
inside a user's wrapper) is rebuilt by the factory with its original head count. ``save`` records, under the
manifest's ``"attributes"``, each listed attribute whose value differs from the factory model's
(``{"encoder.layers.0.self_attn": {"num_heads": 1}}``), and ``load`` sets them on the rebuilt model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchslim.errors import ArtifactError

__all__ = ["ATTRIBUTES", "changed_attributes", "register_module_attribute", "restore_attributes_"]

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


def _int_attribute(module: nn.Module, name: str) -> int | None:
    value = module.__dict__.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def changed_attributes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """Module name -> ``{attribute: value}`` where ``model`` differs from ``reference`` (the factory's model).

    Args:
        model: the model being saved.
        reference: the model its factory builds (after codec replacements or not: codec specs hold their own).

    Returns:
        Only modules present in both, only int attributes from :data:`ATTRIBUTES`.
    """
    references = dict(reference.named_modules())
    changed: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        ref = references.get(name)
        if ref is None:
            continue
        for attr in ATTRIBUTES:
            value = _int_attribute(module, attr)
            if value is not None and value != _int_attribute(ref, attr):
                changed.setdefault(name, {})[attr] = value
    return changed


def restore_attributes_(model: nn.Module, recorded: Any, where: str) -> None:
    """Set the attributes a manifest recorded on the rebuilt ``model``.

    Raises:
        ArtifactError: ``recorded`` is not ``{module: {attribute: int}}`` of known attributes and modules.
    """
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{where}: manifest attributes = {recorded!r} is invalid: expected a dict")
    modules = dict(model.named_modules())
    for name, attrs in recorded.items():
        if name not in modules:
            raise ArtifactError(f"{where}: manifest attributes name module {name!r}, which the rebuilt model lacks")
        if not isinstance(attrs, dict):
            raise ArtifactError(f"{where}: manifest attributes[{name!r}] = {attrs!r} is invalid: expected a dict")
        for attr, value in attrs.items():
            if attr not in ATTRIBUTES or not isinstance(value, int) or isinstance(value, bool):
                raise ArtifactError(
                    f"{where}: manifest attributes[{name!r}][{attr!r}] = {value!r} is invalid: expected an int "
                    f"of one of {', '.join(ATTRIBUTES)}"
                )
            setattr(modules[name], attr, value)

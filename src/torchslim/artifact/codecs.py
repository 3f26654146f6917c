"""Module codecs: how a module whose shape or type differs from the factory model is rebuilt.

A codec turns a module into a JSON-safe ``spec`` (its constructor arguments) and back into a
module with correctly shaped (uninitialised or random) tensors; the weights come from the stored
tensors afterwards. Built-in codecs cover the common layers; packed/quantized layers register
their own with :func:`register_module_codec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModuleCodec:
    """A registered codec (see :func:`register_module_codec`)."""

    cls: type[nn.Module]
    name: str
    to_spec: Callable[[nn.Module], dict[str, Any]]
    from_spec: Callable[[dict[str, Any]], nn.Module]


_BY_TYPE: dict[type, ModuleCodec] = {}
_BY_NAME: dict[str, ModuleCodec] = {}


def register_module_codec(
    cls: type[nn.Module],
    name: str,
    to_spec: Callable[[nn.Module], dict[str, Any]],
    from_spec: Callable[[dict[str, Any]], nn.Module],
) -> None:
    """Teach ``torchslim.save``/``load`` to rebuild modules of exactly type ``cls``.

    Args:
        cls: the module class (subclasses are not matched; register them separately).
        name: stable name written into manifests, e.g. ``"torchslim.PackedLinear"``.
        to_spec: ``module -> dict`` of JSON-safe constructor arguments.
        from_spec: ``dict -> module`` whose parameters and buffers have the saved shapes and dtypes
            (values are overwritten by the stored tensors).

    Raises:
        ValueError: if ``cls`` is not an ``nn.Module`` class, ``name`` is empty, or ``name`` is
            already used by a different class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_module_codec: cls = {cls!r} is invalid: expected an nn.Module subclass")
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_module_codec: name = {name!r} is invalid: expected a non-empty string")
    if not callable(to_spec) or not callable(from_spec):
        raise ValueError(f"register_module_codec({name!r}): to_spec and from_spec must be callables")
    existing = _BY_NAME.get(name)
    if existing is not None and _qualname(existing.cls) != _qualname(cls):
        raise ValueError(
            f"module codec name {name!r} is already registered for {_qualname(existing.cls)}: "
            "choose another name"
        )
    old = _BY_TYPE.get(cls)
    if old is not None and old.name != name:
        _BY_NAME.pop(old.name, None)
    codec = ModuleCodec(cls, name, to_spec, from_spec)
    _BY_TYPE[cls] = codec
    _BY_NAME[name] = codec
    if existing is not None and existing.cls is not cls:  # the same class re-imported: forget the old one
        _BY_TYPE.pop(existing.cls, None)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def codec_for(module: nn.Module) -> ModuleCodec | None:
    """The codec registered for ``type(module)`` (exact type), or None."""
    return _BY_TYPE.get(type(module))


def codec_named(name: str) -> ModuleCodec | None:
    """The codec registered under ``name``, or None."""
    return _BY_NAME.get(name)


def registered_codecs() -> dict[str, type[nn.Module]]:
    """Codec name -> module class."""
    return {name: codec.cls for name, codec in _BY_NAME.items()}


# --- built-in codecs ------------------------------------------------------------------------------
def _linear_spec(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _conv_spec(m: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    padding = m.padding if isinstance(m.padding, str) else list(m.padding)
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _batchnorm_spec(m: nn.BatchNorm1d | nn.BatchNorm2d) -> dict[str, Any]:
    spec = {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }
    if m.affine and m.bias is None:  # BatchNorm(bias=False), torch >= 2.13; omitted otherwise for older torch
        spec["bias"] = False
    return spec


def _layernorm_spec(m: nn.LayerNorm) -> dict[str, Any]:
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": getattr(m, "bias", None) is not None,
    }


def _embedding_spec(m: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "max_norm": m.max_norm,
        "norm_type": m.norm_type,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
    }


def _multihead_attention_spec(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "dropout": m.dropout,
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn,
        "kdim": m.kdim,
        "vdim": m.vdim,
        "batch_first": m.batch_first,
    }


def _register_builtins() -> None:
    register_module_codec(nn.Linear, "nn.Linear", _linear_spec, lambda s: nn.Linear(**s))
    register_module_codec(nn.Conv1d, "nn.Conv1d", _conv_spec, lambda s: nn.Conv1d(**s))
    register_module_codec(nn.Conv2d, "nn.Conv2d", _conv_spec, lambda s: nn.Conv2d(**s))
    register_module_codec(nn.BatchNorm1d, "nn.BatchNorm1d", _batchnorm_spec, lambda s: nn.BatchNorm1d(**s))
    register_module_codec(nn.BatchNorm2d, "nn.BatchNorm2d", _batchnorm_spec, lambda s: nn.BatchNorm2d(**s))
    register_module_codec(nn.LayerNorm, "nn.LayerNorm", _layernorm_spec, lambda s: nn.LayerNorm(**s))
    register_module_codec(nn.Embedding, "nn.Embedding", _embedding_spec, lambda s: nn.Embedding(**s))
    register_module_codec(
        nn.MultiheadAttention,
        "nn.MultiheadAttention",
        _multihead_attention_spec,
        lambda s: nn.MultiheadAttention(**s),
    )
    # a layer removed by structural pruning is often replaced by an identity
    register_module_codec(nn.Identity, "nn.Identity", lambda m: {}, lambda s: nn.Identity())


_register_builtins()

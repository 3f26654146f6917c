"""Model registry: reference models by name, user models by ``module:callable``, others by a registered scheme.

``create_model`` records how a model was built on the module itself, so ``torchslim.save`` can
write the factory into the ``.slim`` manifest and ``torchslim.load`` can rebuild it. A scheme (``hf:DIR``) is
resolved by the loader its package registers with :func:`register_scheme`; the registry never imports that
package's code itself, it only knows which package to import on first use (``SCHEME_PROVIDERS``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.errors import ModelError

FACTORY_ATTR = "_torchslim_factory"
BUILTIN_PREFIX = "torchslim.models:"

_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {}
# scheme -> resolver(spec) returning the factory; filled by register_scheme
_SCHEMES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}
# scheme -> package that registers it when imported (optional back-ends, imported on first use)
SCHEME_PROVIDERS: dict[str, str] = {"hf": "torchslim.hf"}


def register_model(name: str, description: str = "") -> Callable:
    """Decorator: register a factory function under ``name``.

    Args:
        name: registry name (``lenet5``); also reachable as ``torchslim.models:lenet5``.
        description: one line shown by ``torchslim models``; defaults to the docstring's first line.

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        doc = description or next(iter((factory.__doc__ or "").strip().splitlines()), "")
        _MODELS[name] = (factory, doc)
        return factory

    return decorate


def register_scheme(scheme: str, resolver: Callable[[str], Callable[..., nn.Module]]) -> None:
    """Let ``create_model("SCHEME:...")`` build models through ``resolver`` (a back-end registers itself).

    Args:
        scheme: the prefix before the colon (``"hf"``); files naming it are allowlisted (it names data, not code).
        resolver: called with the whole spec (``"hf:DIR"``); returns the factory that ``create_model`` calls
            with its keyword arguments.

    Raises:
        ValueError: ``scheme`` is empty, holds a dot or a colon, or is taken by another resolver.
    """
    if not scheme or "." in scheme or ":" in scheme:
        raise ValueError(f"scheme = {scheme!r} is invalid: expected a name without dots or colons, e.g. 'hf'")
    if _SCHEMES.get(scheme, resolver) is not resolver:
        raise ValueError(f"scheme {scheme!r} is already registered")
    _SCHEMES[scheme] = resolver


def _scheme_resolver(spec: str) -> Callable[[str], Callable[..., nn.Module]] | None:
    scheme, sep, _ = spec.partition(":")
    if not sep or (scheme not in _SCHEMES and scheme not in SCHEME_PROVIDERS):
        return None
    if scheme not in _SCHEMES:
        importlib.import_module(SCHEME_PROVIDERS[scheme])  # registers the scheme
    if scheme not in _SCHEMES:
        raise ModelError(f"model {spec!r}: {SCHEME_PROVIDERS[scheme]} did not register the scheme {scheme!r}")
    return _SCHEMES[scheme]


def list_models() -> dict[str, str]:
    """Return registered model names mapped to their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_MODELS.items())}


def resolve_factory(spec: str, trust: bool) -> tuple[Callable[..., nn.Module], str]:
    """Find the factory for ``spec``; returns it with its full name (``torchslim.models:lenet5``).

    Raises:
        ModelError: unknown name, untrusted ``module:callable``, or nothing callable there.
    """
    name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else spec
    if name in _MODELS:
        return _MODELS[name][0], BUILTIN_PREFIX + name
    resolver = _scheme_resolver(spec)
    if resolver is not None:  # e.g. hf:DIR, a local Hugging Face directory (allowlisted: it names data, not code)
        return resolver(spec), spec
    if ":" not in spec:
        raise ModelError(
            f"model {spec!r} is not registered: expected one of {', '.join(sorted(_MODELS))} "
            "or 'package.module:callable'"
        )
    if not trust:
        raise ModelError(f"model factory {spec!r} is outside the allowlist: pass trust_factory=True to import it")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model factory {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model factory {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory, spec


def create_model(spec: str, *, trust_factory: bool = True, **kwargs: Any) -> nn.Module:
    """Build a model from a registry name or a ``package.module:callable`` spec.

    Args:
        spec: ``lenet5``, ``torchslim.models:lenet5`` or ``my_pkg.nets:build``.
        trust_factory: allow importing a factory outside ``torchslim.models`` (the user asked for
            it by name here; ``torchslim.load`` passes False unless told otherwise).
        **kwargs: keyword arguments for the factory (JSON-serialisable, so they can be saved).

    Returns:
        The model, with its factory recorded for ``torchslim.save``.

    Raises:
        ModelError: unknown name, untrusted or missing factory, or the factory failed.
    """
    factory, full_name = resolve_factory(spec, trust_factory)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model {spec!r} rejected its arguments {kwargs!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    setattr(model, FACTORY_ATTR, {"name": full_name, "kwargs": dict(kwargs)})
    return model


def factory_of(model: nn.Module) -> dict[str, Any] | None:
    """Return ``{"name": ..., "kwargs": ...}`` recorded by :func:`create_model`, or None."""
    recorded = getattr(model, FACTORY_ATTR, None)
    return None if recorded is None else {"name": recorded["name"], "kwargs": dict(recorded["kwargs"])}


def is_allowlisted(name: str) -> bool:
    """True for factories torchslim may import from a file without ``trust_factory``."""
    scheme, sep, _ = name.partition(":")
    return name.startswith(BUILTIN_PREFIX) or (bool(sep) and (scheme in _SCHEMES or scheme in SCHEME_PROVIDERS))

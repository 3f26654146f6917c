"""The ``.slim`` artifact (implementation; ``torchslim.artifact`` re-exports it): one safetensors file holding a
model's tensors and a JSON manifest.

``save`` writes the model's state dict (each tensor dense, bitmask + values, or indices + values,
whichever is smallest; all lossless) and a manifest under the safetensors metadata key
``"torchslim"``::

    {"format": "torchslim.slim", "format_version": 1, "torchslim_version": "0.1.0",
     "factory": {"name": "torchslim.models:lenet5", "kwargs": {}},
     "modules": {"1": {"codec": "nn.Linear", "spec": {"in_features": 784, ...}}},
     "tensors": {"1.weight": {"encoding": "bitmask", "dtype": "float32", "shape": [120, 784],
                              "stored": ["1.weight.values", "1.weight.mask"], "sha256": "9f2c..."}, ...},
     "recipe": ..., "measurements": ..., "extra": ...}

Integrity: each tensor entry records the SHA-256 of its stored arrays' bytes, and the manifest text ends
with ``"manifest_sha256"``, the SHA-256 of the text before it, so any changed byte of a file is either
caught (``ArtifactError`` naming the tensor or the manifest) or harmless (JSON whitespace). Files
written before checksums existed (no such fields) still load, unverified. These checksums detect
accidental corruption; they are not signatures (whoever can edit the file can recompute them).

``load`` rebuilds the model from its factory (allowlisted factories only, unless
``trust_factory=True``), replaces the modules listed in ``modules`` through their codecs, decodes
the tensors and loads them strictly. No pickle is read or written anywhere.
"""

from __future__ import annotations

import importlib
import numbers
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from torchslim._utils import first_line, release_free_memory
from torchslim._version import __version__
from torchslim.artifact.attributes import apply_changes_, module_changes
from torchslim.artifact.codecs import codec_for, codec_named, registered_codecs
from torchslim.artifact.encodings import (
    DENSE,
    ENCODINGS,
    choose_encoding,
    decode_tensor,
    dtype_name,
    encode_tensor,
    parse_dtype,
    parts_digest,
    stored_key,
    tensor_info,
)
from torchslim.artifact.io import (
    FORMAT,
    MANIFEST_KEY,
    corrupted,
    manifest_from_header,
    manifest_text,
    parse_header,
    read_file,
    read_header,
)
from torchslim.config import Config
from torchslim.errors import ArtifactError, ConfigError, TorchSlimError
from torchslim.fileio import atomic_private_path
from torchslim.models.checks import check_finite_weights
from torchslim.models.registry import FACTORY_ATTR, create_model, factory_of, is_allowlisted
from torchslim.onload import materialize_


# --- save ---------------------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    recipe: Any = None,
    measurements: Any = None,
    extra: Any = None,
    factory: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    input_signature: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to a ``.slim`` file atomically (the old file survives any failure).

    Args:
        model: a model built by ``torchslim.models.create_model`` (its factory is recorded), possibly
            changed since (pruned shapes, replaced layers with a registered codec).
        path: destination file; its directory must exist.
        recipe: JSON-safe description of how the model was made (``Config`` objects are converted
            with ``to_dict``).
        measurements: JSON-safe measurement results.
        extra: any other JSON-safe data.
        factory: ``{"name": "pkg.mod:callable", "kwargs": {...}}`` for a model not built with
            ``create_model``; overrides the recorded factory.
        allow_nonfinite: write parameters holding NaN/Inf (e.g. to keep a diverged run for debugging);
            by default such a model is refused.
        input_signature: one sample's input, ``{"shape": [1, 28, 28], "dtype": "float32"}`` (see
            :func:`input_signature`), recorded as the manifest's ``input`` so ``deploy``/``bench`` need no
            example; default: the signature the model carries (``load`` and ``torchslim train`` set it).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ArtifactError: no factory; a non-JSON-safe manifest value (the message names the key); a
            module that differs from the factory model and has no codec; a state entry that is not
            a tensor; the tensors cannot be serialised; the file cannot be written (OSError).
        ModelError: a parameter holds NaN/Inf and ``allow_nonfinite`` is false.
    """
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"save: model is a {type(model).__name__}, expected a torch.nn.Module")
    materialize_(model)  # blocks of a lazily loaded model still in their file
    if not allow_nonfinite:
        check_finite_weights(model, f"save({str(path)!r})", hint=", or pass allow_nonfinite=True to keep it as is")
    if factory is None:
        factory = factory_of(model)
        if factory is None:
            raise ArtifactError(
                f"save({str(path)!r}): the {type(model).__name__} model has no recorded factory, so it "
                "could not be rebuilt on load: build it with torchslim.models.create_model(...) or pass "
                "factory={'name': 'package.module:callable', 'kwargs': {...}}"
            )
    factory = _plain(factory, "factory")
    if not (
        isinstance(factory, dict)
        and isinstance(factory.get("name"), str)
        and isinstance(factory.get("kwargs"), dict)
    ):
        raise ArtifactError(
            f"save: factory = {factory!r} is invalid: expected {{'name': str, 'kwargs': dict}}"
        )
    factory = {"name": factory["name"], "kwargs": factory["kwargs"]}
    sections = {
        key: _plain(value, key)
        for key, value in (("recipe", recipe), ("measurements", measurements), ("extra", extra))
    }
    modules, (attributes, shapes) = _changed_modules(model, factory)
    tensors, entries = _encode_state(model.state_dict())
    manifest = {
        "format": FORMAT,
        # files without shared tensors stay version 1, so older torchslim versions still read them
        "format_version": 2 if any(e["encoding"] == ALIAS for e in entries.values()) else 1,
        "torchslim_version": __version__,
        "factory": factory,
        "modules": modules,
        "tensors": entries,
        **sections,
    }
    if attributes:
        manifest["attributes"] = attributes
    if shapes:
        manifest["shapes"] = shapes
    signature = input_signature if input_signature is not None else getattr(model, "_torchslim_input", None)
    if signature is not None:
        manifest["input"] = _checked_signature(signature, "save: input_signature")
    metadata = {MANIFEST_KEY: manifest_text(manifest)}
    try:
        # streamed from the tensors: no second copy of the whole file in memory
        with atomic_private_path(path) as tmp:
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    except TorchSlimError as exc:  # no such directory
        raise ArtifactError(f"save: {exc}") from exc
    except OSError as exc:  # disk full, permissions...: the old file is untouched
        raise ArtifactError(f"save: cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors raises several types (also for write errors); the cause is chained
        raise ArtifactError(f"save: cannot write {str(path)!r}: {first_line(exc)}") from exc
    return Path(path)


def input_signature(example: torch.Tensor) -> dict[str, Any]:
    """The input signature of a batch: one sample's shape and the dtype, as :func:`save` records it.

    Args:
        example: a tensor with a leading batch dimension.

    Returns:
        ``{"shape": [...], "dtype": "float32"}``.
    """
    return {"shape": [int(d) for d in example.shape[1:]], "dtype": str(example.dtype).removeprefix("torch.")}


def _checked_signature(signature: Any, where: str) -> dict[str, Any]:
    shape = signature.get("shape") if isinstance(signature, dict) else None
    dtype = signature.get("dtype") if isinstance(signature, dict) else None
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                     for d in shape) and isinstance(dtype, str)):
        raise ArtifactError(f"{where} = {signature!r} is invalid: expected {{'shape': [positive ints], "
                            "'dtype': 'float32'}")
    return {"shape": [int(d) for d in shape], "dtype": dtype}


def _plain(value: Any, where: str) -> Any:
    """Return a JSON-safe copy of ``value`` (tuples -> lists, Config -> dict, numpy scalars -> numbers).

    Raises:
        ArtifactError: naming the first key path whose value cannot be written as JSON.
    """
    if isinstance(value, Config):
        value = value.to_dict()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ArtifactError(
                    f"{where}: key {key!r} ({type(key).__name__}) is not allowed: expected str or int"
                )
            out[str(key)] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise ArtifactError(
        f"{where} = {value!r} ({type(value).__name__}) cannot be written to the manifest: "
        "expected None, bool, int, float, str, or lists/dicts of them"
    )


def _build_factory_model(factory: dict[str, Any], *, trust: bool, meta: bool) -> nn.Module:
    """Run the factory without disturbing the global RNG (on the meta device when ``meta``)."""
    with torch.random.fork_rng(devices=[]):
        if meta:
            with torch.device("meta"):
                return create_model(factory["name"], trust_factory=trust, **factory["kwargs"])
        return create_model(factory["name"], trust_factory=trust, **factory["kwargs"])


def _reference_model(factory: dict[str, Any]) -> tuple[nn.Module, bool]:
    """The model the factory builds (meta device if it can), and whether it is on meta."""
    try:
        return _build_factory_model(factory, trust=True, meta=True), True
    except Exception:  # some factories cannot run on the meta device; a real build decides
        pass
    try:
        return _build_factory_model(factory, trust=True, meta=False), False
    except Exception as exc:
        raise ArtifactError(
            f"save: factory {factory['name']!r} with kwargs {factory['kwargs']!r} cannot rebuild the "
            f"model ({exc}), so the file could not be loaded: record a factory that works"
        ) from exc


def _spec(codec, module: nn.Module, name: str) -> dict[str, Any]:
    try:
        spec = codec.to_spec(module)
    except Exception as exc:
        raise ArtifactError(f"save: codec {codec.name!r} cannot describe module {name!r}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ArtifactError(
            f"module {name!r}: codec {codec.name!r} returned a {type(spec).__name__} spec, expected a dict"
        )
    return _plain(spec, f"modules[{name!r}].spec")


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _same_type(module: nn.Module, ref: nn.Module) -> bool:
    """Same class; parametrized modules (weight_norm) get a new class per instance, so compare what they wrap."""
    if type(module) is type(ref):
        return True
    parametrize = torch.nn.utils.parametrize
    return (
        parametrize.is_parametrized(module)
        and parametrize.is_parametrized(ref)
        and parametrize.type_before_parametrizations(module) is parametrize.type_before_parametrizations(ref)
        and set(module.parametrizations) == set(ref.parametrizations)
    )


def _ref_spec(codec, reference: nn.Module, name: str) -> dict[str, Any] | None:
    """Spec of the factory's module, or None if the codec cannot describe it (e.g. on meta)."""
    try:
        return _spec(codec, reference, name)
    except ArtifactError:
        return None


def _changed_modules(
    model: nn.Module, factory: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]:
    """Find the modules that differ from what the factory builds; check the file will load.

    Returns:
        module path -> ``{"codec": name, "spec": {...}}``, and the changed module attributes and resized
        tensors of modules without a codec (:mod:`torchslim.artifact.attributes`).

    Raises:
        ArtifactError: a module differs and has no codec, a factory module is missing, or the
            rebuilt model's tensors would not match the saved state dict.
    """
    reference, on_meta = _reference_model(factory)
    ref_modules = dict(reference.named_modules())
    changed: dict[str, dict[str, Any]] = {}

    def replaced(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in changed)

    seen = set()
    for name, module in model.named_modules():
        seen.add(name)
        if replaced(name):
            continue
        ref = ref_modules.get(name)
        codec = codec_for(module)
        if codec is not None:
            spec = _spec(codec, module, name)
            if ref is None or not _same_type(module, ref) or _ref_spec(codec, ref, name) != spec:
                changed[name] = {"codec": codec.name, "spec": spec}
            continue
        if ref is None or not _same_type(module, ref):
            found = "is absent" if ref is None else f"is a {type(ref).__name__}"
            raise ArtifactError(
                f"save: module {name or '<root>'!r} is a {_type_name(module)}, but in the model built by "
                f"factory {factory['name']!r} it {found}; torchslim cannot rebuild it: register a codec "
                "with torchslim.artifact.register_module_codec "
                f"(registered: {', '.join(sorted(registered_codecs()))})"
            )
    for name, ref in ref_modules.items():
        if name not in seen and not replaced(name):
            raise ArtifactError(
                f"save: module {name!r} ({type(ref).__name__}) of the model built by factory "
                f"{factory['name']!r} is missing from the saved model; replace it (e.g. with nn.Identity) "
                "instead of deleting it"
            )
    # Rebuild as load will and compare the tensors, so a file that cannot load is never written.
    rebuilt = _replace_modules(reference, changed, "save", meta=on_meta, trust=False)
    changes = module_changes(model, rebuilt)
    apply_changes_(rebuilt, *changes, "save")
    _check_state_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, rebuilt, "save", factory)
    return changed, changes


def _encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Encode every state-dict tensor with its cheapest encoding; a tensor shared by several names (tied weights,
    an embedding and ``lm_head`` sharing codes) is stored once, the other names as an ``alias`` entry.

    Returns:
        (stored key -> array for safetensors, tensor name -> manifest entry).
    """
    reserved = set(state)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    seen: dict[tuple, str] = {}  # the same memory seen under an earlier name
    scanned = 0
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(
                f"save: state_dict entry {name!r} is a {type(value).__name__}, expected a tensor "
                "(modules with get_extra_state need a codec that stores it as tensors)"
            )
        if value.device.type == "meta":
            raise ArtifactError(f"save: tensor {name!r} is on the meta device and has no values to save")
        view = _memory_key(value)
        if view is not None and view in seen:
            entries[name] = {"encoding": ALIAS, "alias_of": seen[view], "dtype": dtype_name(value.dtype),
                             "shape": list(value.shape), "stored": []}
            continue
        if view is not None:
            seen[view] = name
        info = tensor_info(value)
        for encoding in choose_encoding(info):
            keys = [stored_key(name, suffix) for suffix in encoding.parts]
            if encoding is DENSE or not any(k in reserved or k in tensors for k in keys):
                break
        else:  # pragma: no cover - dense always fits
            encoding = DENSE
        parts = encode_tensor(encoding, info)
        stored = []
        for suffix, part in parts.items():
            key = stored_key(name, suffix)
            if part.numel():
                pointer = part.untyped_storage().data_ptr()
                if pointer in storages:  # overlapping views: safetensors refuses shared memory
                    part = part.clone()
                    pointer = part.untyped_storage().data_ptr()
                storages.add(pointer)
            tensors[key] = part
            stored.append(key)
        entries[name] = {
            "encoding": encoding.name,
            "dtype": dtype_name(value.dtype),
            "shape": list(value.shape),
            "stored": stored,
            "sha256": parts_digest(tensors[key] for key in stored),
        }
        del info, parts
        scanned += value.numel() * value.element_size()
        if scanned >= _TRIM_EVERY:  # the encoders' temporaries (masks, zlib buffers) fragment the heap
            release_free_memory()
            scanned = 0
    return tensors, entries


_TRIM_EVERY = 64 * 2**20  # bytes of state encoded between two hand-backs of free heap memory


ALIAS = "alias"  # a manifest entry naming the tensor it shares memory with (format_version 2)


def _memory_key(value: torch.Tensor) -> tuple | None:
    """What makes two tensors the same memory (storage, offset, shape, strides, dtype); None for empty ones."""
    if not value.numel():
        return None
    return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
            value.dtype)


def _tie_aliases_(model: nn.Module, entries: dict[str, dict[str, Any]]) -> None:
    """Make every ``alias`` tensor the same object as the one it names (tied again after loading)."""
    for name, entry in entries.items():
        if entry["encoding"] != ALIAS:
            continue
        owner, _, attr = name.rpartition(".")
        target_owner, _, target_attr = entry["alias_of"].rpartition(".")
        module, source = model.get_submodule(owner), model.get_submodule(target_owner)
        for table in ("_parameters", "_buffers"):
            if attr in getattr(module, table) and target_attr in getattr(source, table):
                getattr(module, table)[attr] = getattr(source, table)[target_attr]


# --- load ---------------------------------------------------------------------------------------
RUNTIMES = ("auto", "compact", "dense", "reference", "w8a8")
# Called as hook(model, runtime) after a load; packed-layer modules register theirs (a lower layer never imports them).
_LOAD_HOOKS: list[Callable[[nn.Module, str], Any]] = []


def register_load_hook(hook: Callable[[nn.Module, str], Any]) -> None:
    """Run ``hook(model, runtime)`` on every model :func:`load` returns (once per hook)."""
    if hook not in _LOAD_HOOKS:
        _LOAD_HOOKS.append(hook)


def load(
    path: str | os.PathLike,
    *,
    trust_factory: bool = False,
    map_location: str | torch.device = "cpu",
    runtime: str = "auto",
) -> nn.Module:
    """Load a ``.slim`` file written by :func:`save`.

    Args:
        path: the file.
        trust_factory: allow a model factory outside ``torchslim.models:`` and ``hf:`` (it imports
            and runs code named by the file: only for files you trust).
        map_location: device for the returned model.
        runtime: how packed layers compute (:mod:`torchslim.quantize.runtime`): ``"auto"`` (the fastest
            measured path per layer, never slower than fp32), ``"compact"`` (no fp32 copies), ``"dense"``
            (decode once), ``"reference"`` (dequantize on every call) or ``"w8a8"`` (auto, plus int8 x int8
            products with activations rounded per row for inputs of several rows: faster, not bit-equal).

    Returns:
        The model in eval mode, with its factory recorded (so it can be saved again).

    Raises:
        ArtifactError: missing, truncated or corrupted file; not a torchslim file; newer format;
            untrusted or failing factory; unknown codec or encoding (codecs named
            ``"torchslim.x:Class"`` are imported on demand, others only with ``trust_factory``);
            tensors that disagree with the manifest or the rebuilt model (the message names the tensor).
        ConfigError: unknown ``runtime``.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime = {runtime!r} is invalid: expected one of {', '.join(map(repr, RUNTIMES))}")
    where = str(path)
    data = read_file(path)
    header = parse_header(data, len(data), where)
    manifest = manifest_from_header(header, where)
    try:
        stored = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends: the bytes are not a valid file
        raise corrupted(where, first_line(exc)) from exc
    del data
    factory = manifest["factory"]
    model = _rebuild(manifest, where, trust_factory)
    apply_changes_(model, manifest.get("attributes", {}), manifest.get("shapes", {}), where)
    state = _decode_all(manifest["tensors"], stored.__getitem__, set(stored), where)
    _check_state_shapes({k: tuple(v.shape) for k, v in state.items()}, model, where, factory)
    current = model.state_dict(keep_vars=True)
    try:
        for key, tensor in state.items():
            target = current[key]
            if target.dtype != tensor.dtype:  # e.g. a half-precision model: keep the saved dtype
                target.data = target.data.to(tensor.dtype)
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{where}: the stored tensors do not fit the rebuilt model: {exc}") from exc
    _tie_aliases_(model, manifest["tensors"])
    try:
        model = model.to(map_location)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{where}: cannot move the model to map_location={map_location!r}: {exc}"
        ) from exc
    if manifest.get("input") is not None:
        model._torchslim_input = _checked_signature(manifest["input"], f"{where}: manifest input")
    for hook in _LOAD_HOOKS:
        hook(model, runtime)
    return model.eval()


def _rebuild(manifest: dict[str, Any], where: str, trust_factory: bool) -> nn.Module:
    factory = manifest["factory"]
    name = factory["name"]
    if not trust_factory and not is_allowlisted(name):
        raise ArtifactError(
            f"{where}: model factory {name!r} is outside the allowlist ('torchslim.models:*', 'hf:*'); "
            "loading it would import and run that code: pass trust_factory=True (--trust-factory) only "
            "if you trust this file"
        )
    try:
        model = _build_factory_model(factory, trust=trust_factory, meta=False)
    except Exception as exc:
        raise ArtifactError(
            f"{where}: cannot rebuild the model from factory {name!r} with kwargs "
            f"{factory['kwargs']!r}: {exc}"
        ) from exc
    return _replace_modules(model, manifest["modules"], where, meta=False, trust=trust_factory)


_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _find_codec(codec_name: str, module_name: str, where: str, trust: bool):
    """The codec registered as ``codec_name``, importing its module when the name says which.

    Codec names of the form ``"package.module:Class"`` are imported on demand: modules inside
    ``torchslim`` always (so a fresh process can load quantized files), others only with
    ``trust_factory=True`` (importing runs code named by the file).

    Raises:
        ArtifactError: the codec is not registered and cannot (or may not) be imported.
    """
    codec = codec_named(codec_name)
    package = codec_name.partition(":")[0] if ":" in codec_name else ""
    own = package == "torchslim" or package.startswith("torchslim.")
    if codec is None and _MODULE_PATH.fullmatch(package) and (own or trust):
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ArtifactError(
                f"{where}: module {module_name!r} needs codec {codec_name!r}, but {package!r} cannot be "
                f"imported ({exc})"
            ) from exc
        codec = codec_named(codec_name)
    if codec is None:
        hint = " (pass trust_factory=True to let torchslim import it)" if package and not own else ""
        raise ArtifactError(
            f"{where}: module {module_name!r} needs codec {codec_name!r}, which is not registered: import "
            f"the package that registers it{hint} (registered: {', '.join(sorted(registered_codecs()))})"
        )
    return codec


def _replace_modules(
    model: nn.Module, modules: dict[str, dict[str, Any]], where: str, *, meta: bool, trust: bool
) -> nn.Module:
    """Replace each listed module by ``codec.from_spec(spec)``; returns the (possibly new) root."""
    for name, entry in modules.items():
        codec = _find_codec(entry["codec"], name, where, trust)
        try:
            with torch.random.fork_rng(devices=[]):
                if meta:
                    with torch.device("meta"):
                        module = codec.from_spec(dict(entry["spec"]))
                else:
                    module = codec.from_spec(dict(entry["spec"]))
        except Exception as exc:
            raise ArtifactError(
                f"{where}: codec {entry['codec']!r} cannot rebuild module {name!r} from spec "
                f"{entry['spec']!r}: {exc}"
            ) from exc
        if not isinstance(module, nn.Module):
            raise ArtifactError(
                f"{where}: codec {entry['codec']!r} returned a {type(module).__name__} for module {name!r}, "
                "expected an nn.Module"
            )
        if name == "":
            recorded = getattr(model, FACTORY_ATTR, None)
            model = module
            if recorded is not None:
                setattr(model, FACTORY_ATTR, recorded)
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError as exc:
            raise ArtifactError(
                f"{where}: module {name!r} cannot be placed: the rebuilt model has no module {parent_name!r}"
            ) from exc
        setattr(parent, child, module)
    return model


def _decode_all(
    entries: dict[str, dict[str, Any]], fetch, available: set[str], where: str
) -> dict[str, torch.Tensor]:
    """Decode every manifest tensor; ``fetch(key)`` returns a stored array.

    Raises:
        ArtifactError: a stored array missing or unlisted, or one that disagrees with the manifest.
    """
    state = {}
    used: set[str] = set()
    for name, entry in entries.items():
        if entry["encoding"] != ALIAS:
            state[name] = _decode_one(name, entry, fetch, available, where)
            used.update(entry["stored"])
    for name, entry in entries.items():
        if entry["encoding"] == ALIAS:
            state[name] = _decode_alias(name, entry, state, where)
    unexpected = sorted(available - used)
    if unexpected:
        raise ArtifactError(
            f"{where}: stored array {unexpected[0]!r} is not listed in the manifest's tensors "
            f"({len(unexpected)} unlisted; corrupted or hand-edited file)"
        )
    return state


def _decode_alias(name: str, entry: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    target = state.get(entry.get("alias_of"))  # type: ignore[arg-type]
    if target is None or list(target.shape) != entry["shape"] or dtype_name(target.dtype) != entry["dtype"]:
        raise ArtifactError(
            f"{where}: tensor {name!r}: alias_of = {entry.get('alias_of')!r} is invalid: expected the name of a "
            f"stored tensor of shape {entry['shape']} and dtype {entry['dtype']}"
        )
    return target


def _decode_one(name: str, entry: dict[str, Any], fetch, available: set[str], where: str) -> torch.Tensor:
    encoding = ENCODINGS.get(entry["encoding"])
    label = f"{where}: tensor {name!r}"
    if encoding is None:
        return decode_tensor(entry["encoding"], {}, torch.float32, (), label)  # raises the standard message
    expected = [stored_key(name, suffix) for suffix in encoding.parts]
    if sorted(entry["stored"]) != sorted(expected):
        raise ArtifactError(
            f"{where}: tensor {name!r} lists stored arrays {entry['stored']!r}, expected {expected!r} "
            f"for encoding {encoding.name!r}"
        )
    parts, by_key = {}, {}
    for suffix, key in zip(encoding.parts, expected, strict=True):
        if key not in available:
            raise ArtifactError(f"{where}: tensor {name!r}: stored array {key!r} is missing from the file")
        parts[suffix] = by_key[key] = fetch(key)
    dtype = parse_dtype(entry["dtype"], label)
    tensor = decode_tensor(encoding.name, parts, dtype, tuple(entry["shape"]), label)
    # after decoding, so a malformed array keeps its specific message; the checksum catches the rest
    recorded = entry.get("sha256")
    if recorded is not None and parts_digest(by_key[key] for key in entry["stored"]) != recorded:
        raise ArtifactError(
            f"{where}: tensor {name!r}: stored bytes do not match the manifest's sha256 checksum (the file "
            "was corrupted or changed after it was written; use the original file)"
        )
    return tensor


def _check_state_shapes(
    shapes: dict[str, tuple[int, ...]], model: nn.Module, where: str, factory: dict[str, Any]
) -> None:
    """Compare tensor names and shapes with the (rebuilt) model's state dict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    origin = f"the model rebuilt from factory {factory['name']!r}"
    for key in shapes:
        if key not in expected:
            raise ArtifactError(
                f"{where}: saved tensor {key!r} has no place in {origin} (remove pruning reparametrizations, "
                "e.g. torch.nn.utils.prune.remove, or register a codec for its module)"
            )
    for key in expected:
        if key not in shapes:
            raise ArtifactError(f"{where}: tensor {key!r} of {origin} is not in the saved tensors")
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise ArtifactError(
                f"{where}: tensor {key!r} has shape {list(shape)} in the saved tensors but "
                f"{list(expected[key])} in {origin} (a module whose shape changed needs a codec)"
            )


# --- inspection ---------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.slim`` file's manifest from its header, without reading the tensors.

    Args:
        path: the file.

    Returns:
        The manifest dict (layout in the module docstring).

    Raises:
        ArtifactError: missing or corrupted file, no manifest, newer format, malformed manifest.
    """
    return manifest_from_header(read_header(path), str(path))


def tensor_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per model tensor: how it is stored and what it costs.

    Args:
        path: a ``.slim`` file.

    Returns:
        Rows with ``name``, ``encoding``, ``dtype``, ``shape``, ``numel``, ``nonzero`` (elements that
        are not zero), ``stored_bytes`` (bytes of its stored arrays, from the header) and ``bytes``
        (the same number).

    Raises:
        ArtifactError: missing, corrupted or inconsistent file.
    """
    where = str(path)
    header = read_header(path)
    manifest = manifest_from_header(header, where)
    available = {key for key in header if key != "__metadata__"}
    rows = []
    try:
        handle = safetensors.safe_open(str(path), framework="pt")
    except Exception as exc:
        raise corrupted(where, first_line(exc)) from exc
    with handle:
        for name, entry in manifest["tensors"].items():
            source = entry.get("alias_of") if entry["encoding"] == ALIAS else name  # an alias stores nothing
            if source not in manifest["tensors"] or manifest["tensors"][source]["encoding"] == ALIAS:
                _decode_alias(name, entry, {}, where)  # raises the standard message
            tensor = _decode_one(source, manifest["tensors"][source], handle.get_tensor, available, where)
            stored_bytes = sum(
                header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in entry["stored"]
            )
            rows.append(
                {
                    "name": name,
                    "encoding": entry["encoding"],
                    "dtype": entry["dtype"],
                    "shape": list(entry["shape"]),
                    "numel": tensor.numel(),
                    "nonzero": int(torch.count_nonzero(tensor)) if tensor.numel() else 0,
                    "stored_bytes": stored_bytes,
                    "bytes": stored_bytes,
                }
            )
    return rows

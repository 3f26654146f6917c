"""Build a transformers model whose decoder blocks stay in their safetensors file (``ts.load_hf(DIR, lazy=True)``).

The model is constructed with every parameter on ``meta`` (buffers, such as rotary frequencies, are computed as
usual), the tensors outside the block list (embeddings, final norm, ``lm_head``) are read from the file, and the
blocks get an :class:`~torchslim.onload.Onloader` that reads each one when it is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.onload import Onloader, Source, assign_tensor
from torchslim.quantize.blockwise import find_blocks

__all__ = ["build_lazy"]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Meanwhile every parameter a module registers is moved to ``meta`` (buffers stay where they are made)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _file_keys(files: list[Path]) -> dict[str, Path] | None:
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
                keys.update(dict.fromkeys(handle.keys(), file))
        except TypeError:  # a safetensors without the pread backend
            return None
    return keys


def build_lazy(cls: Any, config: Any, files: list[Path]) -> tuple[nn.Module, Onloader] | None:
    """The model with its blocks' parameters still in ``files``, and the onloader that reads them.

    Args:
        cls: the transformers model class; config: its config (``_attn_implementation`` already chosen).
        files: the directory's safetensors files.

    Returns:
        ``(model, onloader)``, or None when the file's keys do not map one to one onto the model's tensors
        (renamed checkpoints, ``Conv1D`` layers, no block list): the caller then loads the model whole.
    """
    keys = _file_keys(files)
    if keys is None:
        return None
    with _parameters_on_meta():
        hf = cls._from_config(config, dtype=torch.float32)
    if any(type(m).__name__ == "Conv1D" for m in hf.modules()):  # converted to Linear after loading: not lazy
        return None
    found = find_blocks(hf, [m for m in hf.modules() if isinstance(m, nn.Linear)])
    if found is None:
        return None
    block_list, blocks = found
    prefix = getattr(hf, "base_model_prefix", "")

    def file_key(name: str) -> str | None:
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1 :] if name.startswith(prefix + ".") else f"{prefix}.{name}"]
        return next((c for c in candidates if c in keys), None)

    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}  # one entry per tensor, with every name it has
    tensors: dict[int, torch.Tensor] = {}
    for module_name, module in hf.named_modules(remove_duplicate=False):
        named = [(n, p) for n, p in module._parameters.items() if p is not None]
        named += [(n, b) for n, b in module._buffers.items()
                  if b is not None and n not in module._non_persistent_buffers_set]
        for attr, tensor in named:
            full = f"{module_name}.{attr}" if module_name else attr
            owners.setdefault(id(tensor), []).append((full, module, attr))
            tensors[id(tensor)] = tensor
    sources: dict[nn.Module, list[Source]] = {block: [] for block in blocks}
    eager: list[tuple[str, list[tuple[str, nn.Module, str]]]] = []
    for ident, names in owners.items():
        key = next((k for k in (file_key(full) for full, _, _ in names) if k is not None), None)
        if key is None:
            return None  # a tensor the file does not hold: let transformers decide (init, rename ...)
        inside = [_block_index(full, block_list, len(blocks)) for full, _, _ in names]
        if all(i is None for i in inside):
            eager.append((key, names))
        elif len(names) == 1 and tensors[ident].device.type == "meta":
            _, module, attr = names[0]
            sources[blocks[inside[0]]].append(Source(module, attr, keys[key], key))
        else:
            return None  # a block tensor tied to another one, or a block buffer: not split safely
    _load_now(eager, keys)
    return hf, Onloader(sources)


def _block_index(name: str, block_list: str, count: int) -> int | None:
    head = f"{block_list}." if block_list else ""
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() and int(index) < count else None


def _load_now(entries: list[tuple[str, list[tuple[str, nn.Module, str]]]], keys: dict[str, Path]) -> None:
    """Read the tensors outside the blocks; a tensor with several names (tied weights) stays one tensor."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, list[tuple[str, nn.Module, str]]]]] = {}
    for key, names in entries:
        by_file.setdefault(keys[key], []).append((key, names))
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
            for key, names in items:
                value = handle.get_tensor(key)
                for _, module, name in names:  # the first assignment's tensor is shared by the other names
                    value = assign_tensor(module, name, key, value)

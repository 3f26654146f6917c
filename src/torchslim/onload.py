"""Weights that stay in their file until their block runs: quantize a model larger than the memory it would take.

A model loaded with ``ts.load_hf(DIR, lazy=True)`` has every decoder block's parameters on the ``meta`` device; an
:class:`Onloader` registered for the model knows, for each block, which tensors of which safetensors file fill it.
A block is read from the file (``pread``: ordinary memory, freed with the block's layers) the first time it runs,
and stays. GPTQ (:func:`torchslim.quantize.gptq_`) goes further: its capture pass reads each block, runs it and puts
it back on ``meta`` (:meth:`Onloader.streaming`), then its block loop reads one block at a time and replaces its
layers by their quantized form before the next block is read, so the float blocks are never all in memory at once.

Everything else that reads weights directly (``quantize_``, ``prune_``, ``save`` ...) first loads all blocks
(:func:`materialize_`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from torchslim._utils import release_free_memory
from torchslim.errors import ModelError

__all__ = ["Onloader", "materialize_", "onloader_of"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter (or persistent buffer) of a block is stored.

    Attributes:
        module: the module that owns it; name: its attribute name there.
        file: the safetensors file; key: its key in that file.
    """

    module: nn.Module
    name: str
    file: Path
    key: str


class Onloader:
    """Fills blocks whose parameters are on ``meta`` from their safetensors file.

    Args:
        blocks: each lazy block -> the sources of its tensors.
        dtype: the dtype tensors are converted to (the model's float dtype).
    """

    def __init__(self, blocks: dict[nn.Module, list[Source]], dtype: torch.dtype = torch.float32) -> None:
        self._sources = dict(blocks)
        self._pending = set(self._sources)
        self._dtype = dtype
        self._streaming = False
        self._streamed: set[nn.Module] = set()
        self._hooks = [block.register_forward_pre_hook(self._before) for block in self._sources]
        self._owners: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()
        for block in self._sources:
            for module in block.modules():
                self._owners.setdefault(module, []).append(block)

    def load_for(self, module: nn.Module) -> None:
        """Load the block that contains ``module`` (no-op for modules outside the lazy blocks)."""
        for block in self._pending.intersection(self._owners.get(module, ())):
            self.load(block)

    @property
    def done(self) -> bool:
        """Every block is loaded."""
        return not self._pending

    def load(self, block: nn.Module) -> None:
        """Read ``block``'s tensors from the file (no-op when it is loaded).

        Raises:
            ModelError: the file cannot be read or a tensor's shape differs from the model's.
        """
        if block not in self._pending:
            return
        from safetensors import safe_open

        by_file: dict[Path, list[Source]] = {}
        for source in self._sources[block]:
            by_file.setdefault(source.file, []).append(source)
        for file, sources in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu", backend="pread") as handle:
                    for source in sources:
                        _assign(source, handle.get_tensor(source.key).to(self._dtype))
            except ModelError:
                raise
            except Exception as exc:  # safetensors raises its own error types; the cause is chained
                raise ModelError(f"cannot read the weights of a block from {str(file)!r}: {exc}") from exc
        self._pending.discard(block)
        if self._streaming:
            self._streamed.add(block)
            return
        # loaded for good: forget the sources, whose module references would keep replaced (quantized) layers and
        # their float weights alive
        self._sources[block] = []
        if not self._pending:
            self.close()

    def unload(self, block: nn.Module) -> None:
        """Put ``block``'s tensors back on ``meta`` (they are read again when it next runs)."""
        for source in self._sources[block]:
            _assign(source, _current(source).to("meta"))
        self._pending.add(block)
        release_free_memory()

    def load_all(self) -> None:
        """Load every block still on ``meta``."""
        for block in list(self._sources):
            self.load(block)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Meanwhile each block is loaded just before it runs and unloaded right after (one pass over the model
        holds one block's float weights at a time)."""
        hooks = [block.register_forward_hook(self._after) for block in self._sources]
        self._streaming = True
        try:
            yield
        finally:
            self._streaming = False
            for hook in hooks:
                hook.remove()
            for block in self._streamed - self._pending:  # loaded but never ran to the end (a pass stopped early)
                self.unload(block)
            self._streamed.clear()

    def close(self) -> None:
        """Remove the load-on-first-run hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _before(self, block: nn.Module, args: tuple) -> None:
        self.load(block)

    def _after(self, block: nn.Module, args: tuple, output: object) -> None:
        if self._streaming and block in self._streamed:  # not a block loaded for good before the pass
            self.unload(block)
            self._streamed.discard(block)


def _current(source: Source) -> Tensor:
    return current_tensor(source.module, source.name)


def _assign(source: Source, value: Tensor) -> None:
    assign_tensor(source.module, source.name, source.key, value)


def current_tensor(module: nn.Module, name: str) -> Tensor:
    """The module's parameter or buffer ``name``."""
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def assign_tensor(module: nn.Module, name: str, key: str, value: Tensor) -> Tensor:
    """Put ``value`` (read from the file under ``key``) in place of the module's parameter or buffer ``name``.

    A parameter gets a new ``nn.Parameter`` unless ``value`` already is one (tied names then share it).

    Returns:
        What was assigned.

    Raises:
        ModelError: the shapes differ (the message names the key and both shapes).
    """
    current = current_tensor(module, name)
    if tuple(value.shape) != tuple(current.shape):
        raise ModelError(f"{key}: the file holds shape {tuple(value.shape)}, the model expects "
                         f"{tuple(current.shape)}")
    if name in module._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)
        module._parameters[name] = value
    else:
        module._buffers[name] = value
    return value


_REGISTRY: weakref.WeakKeyDictionary[nn.Module, Onloader] = weakref.WeakKeyDictionary()


def register(model: nn.Module, onloader: Onloader) -> None:
    """Attach ``onloader`` to ``model`` (found again by :func:`onloader_of`)."""
    _REGISTRY[model] = onloader


def onloader_of(model: nn.Module) -> Onloader | None:
    """The model's :class:`Onloader` while some of its blocks are still in their file, else None."""
    onloader = _REGISTRY.get(model)
    if onloader is not None and onloader.done:
        del _REGISTRY[model]
        return None
    return onloader


def materialize_(model: nn.Module) -> nn.Module:
    """Load every block of a lazily loaded model (a no-op for other models).

    Args:
        model: the model.

    Returns:
        The same model, every weight in memory.
    """
    onloader = onloader_of(model)
    if onloader is not None:
        onloader.load_all()
        _REGISTRY.pop(model, None)
    return model

"""Small internal helpers used across the package: modes, devices, logits, error summaries, pixel shifts.

The lowest layer beside ``errors``: it imports only torch and ``torchslim.errors``.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim.errors import ModelError

__all__ = [
    "device_of", "eval_mode", "first_line", "logits_of", "release_free_memory", "shift_images", "train_mode",
]


@contextlib.contextmanager
def _mode(models: tuple[nn.Module, ...], training: bool) -> Iterator[None]:
    # weak keys: a module replaced meanwhile (a quantized layer) is freed at once, not kept until the exit
    saved = weakref.WeakKeyDictionary((module, module.training) for model in models for module in model.modules())
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for module, was_training in saved.items():
            module.training = was_training


def eval_mode(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put ``models`` (every submodule) in eval mode; on exit restore each module's own mode, even after an error.

    Args:
        *models: the modules (several: e.g. a model and its reference, switched together).

    Returns:
        The context manager.
    """
    return _mode(models, False)


def train_mode(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put ``models`` in train mode; on exit restore each module's own mode (see :func:`eval_mode`)."""
    return _mode(models, True)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else its first buffer, else the CPU (a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def logits_of(output: Any, where: str = "model") -> Tensor:
    """The logits in a model output: the tensor itself, else its ``.logits`` tensor, else the first tensor of a tuple.

    Args:
        output: what the model's forward returned (a tensor, a Hugging Face output, a tuple or list).
        where: who asks, for the error message.

    Returns:
        The logits tensor.

    Raises:
        ModelError: the output holds no such tensor.
    """
    if isinstance(output, Tensor):
        return output
    found = getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ModelError(f"{where}: the model returns a {type(output).__name__}: expected logits (a tensor, an object "
                     "with a .logits tensor, or a tuple whose first element is a tensor)")


def release_free_memory() -> None:
    """Hand the allocator's free heap memory back to the operating system (glibc's ``malloc_trim``; a no-op
    elsewhere).

    glibc keeps freed blocks of its heap for reuse, so after a float layer is replaced by its quantized form the
    process's resident memory often stays where it was; long layer-by-layer loops (GPTQ) call this between
    layers so their peak follows what is alive.
    """
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None  # glibc's malloc_trim once looked up (False: not available)


_INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_has_int8_dot_product(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies int8 by int8 into 32-bit sums in one instruction (x86 VNNI or AMX; ARM).

    Without it, ONNX Runtime's and oneDNN's x86 int8 kernels add pairs of uint8 x int8 products into 16-bit sums
    that saturate at full 8-bit weights, which is why int8 weights default to 7 bits (``reduce_range``).

    Args:
        cpuinfo: the Linux file listing the CPU's flags (read on x86 only).

    Returns:
        True on ARM and on x86 CPUs whose flags list ``avx512_vnni``, ``avx_vnni`` or ``amx_int8``; False otherwise,
        including when the flags cannot be read.
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return True
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return bool(_INT8_DOT_FLAGS & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return False


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors.

    Args:
        exc: the exception.
        limit: cut the line to at most this many characters (None: the whole line).

    Returns:
        The line.
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]


def shift_images(images: Tensor, offsets: Tensor) -> Tensor:
    """Shift each image by its own whole-pixel offset, edges replicated: ``out[i, :, y, x] = images[i, :, y-dy, x-dx]``.

    Args:
        images: ``(N, C, H, W)``.
        offsets: ``(N, 2)`` integer ``(dy, dx)`` per image (or ``(1, 2)``, one offset for all); positive moves the
            content down/right.

    Returns:
        A new tensor like ``images`` (the values are copies: no arithmetic, so bit-exact).
    """
    n, _, h, w = images.shape
    offsets = offsets.to(device=images.device, dtype=torch.long).expand(n, 2)
    pad = int(offsets.abs().max()) if offsets.numel() else 0
    if pad == 0:
        return images.clone()
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    rows = torch.arange(h, device=images.device) + pad - offsets[:, :1]  # (n, h)
    cols = torch.arange(w, device=images.device) + pad - offsets[:, 1:]  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] -> (n, h, w, c) -> (n, c, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

"""Small tensor functions compiled by inductor (PyTorch's compiler, C++ backend on CPU), called without dynamo.

The function is traced once per argument shapes with ``make_fx`` and handed to ``torch._inductor.compile``: calling
the result skips dynamo's guard checks and compiled-region wrapper, which cost ~40 us a call through
``torch.compile`` (an LLM decode step makes 211 such calls); a 576 x 576 GEMV went from 69 to 33 us in a scratch
timeit run during development (not kept).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["compiled", "kernel_bias"]

_COMPILED: dict[str, Callable[..., Tensor]] = {}


def kernel_bias(bias: Tensor | None, zeros: Tensor) -> Tensor:
    """The bias a compiled kernel takes: float32, or ``zeros`` for a layer without one (one graph serves both)."""
    if bias is None:
        return zeros
    return bias if bias.dtype == torch.float32 else bias.to(torch.float32)


def compiled(name: str, fn: Callable[..., Tensor], args: tuple[Tensor, ...]) -> Callable[..., Tensor]:
    """``fn`` compiled for the shapes and dtypes of ``args`` (cached under ``name`` and those shapes).

    Args:
        name: identifies ``fn`` in the cache (one name per function).
        fn: a function of tensors that ``make_fx`` can trace.
        args: example arguments; later calls must pass contiguous tensors of the same shapes and dtypes (the
            compiled code does not check).

    Returns:
        The compiled function (raises what inductor raises when it cannot compile, e.g. without a C++ compiler).
    """
    key = name + "|" + "|".join(f"{tuple(a.shape)}{a.dtype}" for a in args)
    result = _COMPILED.get(key)
    if result is None:
        import torch._inductor
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(fn)(*args)
        # no per-call size/stride asserts (~5 us a call): callers pass contiguous tensors of the traced shapes
        with torch._inductor.config.patch(size_asserts=False):
            result = _COMPILED[key] = torch._inductor.compile(graph, list(args))
    return result

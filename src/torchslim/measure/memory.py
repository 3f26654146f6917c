"""Peak memory of one forward pass.

On CUDA the CUDA caching allocator's own peak counter is used (``max_memory_allocated`` after
``reset_peak_memory_stats``): everything allocated on the device at the peak, weights included.

On CPU there is no process-wide allocator counter, so the peak is reconstructed from the
profiler's allocation events (``torch.profiler`` with ``profile_memory=True``): the running sum of
allocations (+) and frees (-) recorded during the forward, in time order, gives the peak of the
memory the forward itself allocated (activations, workspaces, the output). Added to it are the
bytes of the memory the forward uses but did not allocate: the model's parameters and buffers
(each counted once) and the input tensor(s). Not counted: the Python interpreter, the allocator's
caching or fragmentation, and memory allocated by libraries outside PyTorch's allocator.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from torchslim._utils import device_of, eval_mode
from torchslim.measure._common import call, to_device


def _tensor_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, Tensor):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _inputs_as_list(inputs: Any) -> list:
    return list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]


def _allocation_events(prof: profile) -> list[tuple[int, int]]:
    """Return ``(time, signed bytes)`` CPU allocation events, raw if possible, else per-op."""
    events: list[tuple[int, int]] = []
    try:  # raw allocator events: one per allocation / free, signed nbytes
        for event in prof.profiler.kineto_results.events():
            if event.name() == "[memory]" and event.device_type() == DeviceType.CPU:
                events.append((event.start_ns(), int(event.nbytes())))
    except (AttributeError, RuntimeError, TypeError):
        events = []
    if not events:
        try:  # coarser: allocations attributed to ops (net per op), frees outside ops as [memory]
            for event in prof.events():
                if event.self_cpu_memory_usage:
                    events.append((int(event.time_range.start * 1e3), int(event.self_cpu_memory_usage)))
        except (AttributeError, RuntimeError, TypeError):
            events = []
    events.sort(key=lambda item: item[0])
    return events


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto prints ``profiler_start``/``profiler_stop`` lines from C++ straight to file descriptor 2;
    keep them out of the CLI's output by pointing fd 2 at /dev/null while the profiler runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(model: nn.Module, inputs: Any) -> int | None:
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(model, inputs)
    events = _allocation_events(prof)
    if not events:
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    resident = _tensor_bytes([*model.parameters(), *model.buffers()]) + _tensor_bytes(_inputs_as_list(inputs))
    return resident + peak


def peak_memory_bytes(model: nn.Module, example_input: Any) -> int | None:
    """Peak memory in bytes of one forward of ``model`` on ``example_input`` (eval, inference mode).

    See the module docstring for what is counted on CPU and on CUDA. The model's mode is restored.

    Args:
        model: the model.
        example_input: the batch to run (a tensor or tuple of tensors); the peak grows with it.

    Returns:
        The peak in bytes, or ``None`` if the profiler recorded no usable allocation events.
    """
    device = device_of(model)
    inputs = to_device(example_input, device)
    with eval_mode(model), torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            call(model, inputs)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        return _cpu_peak_bytes(model, inputs)

"""Forward-pass latency: medians over repeated runs with ``torch.utils.benchmark.Timer``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from torchslim._utils import device_of, eval_mode
from torchslim.measure._common import call


def repeat_batch(example_input: Tensor, batch_size: int) -> Tensor:
    """Build a batch of ``batch_size`` samples by repeating the samples of ``example_input``."""
    n = example_input.shape[0]
    if n == 0:
        raise ValueError("example_input has no samples: expected a leading batch dimension >= 1")
    reps = math.ceil(batch_size / n)
    return example_input.repeat(reps, *([1] * (example_input.dim() - 1)))[:batch_size].contiguous()


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    batch_sizes: Sequence[int] = (1, 32),
    *,
    num_threads: int | None = None,
    min_run_time: float = 0.2,
    warmup: int = 3,
) -> dict[int, dict]:
    """Time ``model`` forward passes for each batch size (eval mode, ``torch.inference_mode``).

    For each batch size the input is ``example_input``'s samples repeated to that size; the model
    runs ``warmup`` times untimed, then ``Timer.blocked_autorange`` times it for at least
    ``min_run_time`` seconds. Each of ``m.times`` is the mean time of one forward pass within one
    timed block; median and 90th percentile are taken over those. The model's mode is restored.

    Args:
        model: the model to time.
        example_input: a tensor with a leading batch dimension (one sample is enough), or a tuple of such
            tensors for a model with several inputs (passed as positional arguments, e.g. token ids and a mask).
        batch_sizes: batch sizes to time.
        num_threads: intra-op threads during warm-up and timing (default ``torch.get_num_threads()``).
        min_run_time: seconds of timed runs per batch size.
        warmup: untimed forward passes before timing.

    Returns:
        ``{batch: {"median_ms", "p90_ms", "throughput_per_s", "runs"}}`` where throughput is samples
        per second at the median and ``runs`` is the number of timed blocks the statistics use.

    Raises:
        ValueError: for a non-positive batch size, thread count or run time, or a negative warm-up.
    """
    for batch in batch_sizes:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch_sizes contains {batch!r}: expected integers >= 1")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"num_threads = {num_threads!r} is invalid: expected an integer >= 1")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time = {min_run_time!r} is invalid: expected a number > 0")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup = {warmup!r} is invalid: expected an integer >= 0")

    device = device_of(model)
    several = isinstance(example_input, (tuple, list))
    inputs = tuple(example_input) if several else (example_input,)
    inputs = tuple(t.to(device) for t in inputs)
    results: dict[int, dict] = {}
    with eval_mode(model), torch.inference_mode(), _torch_threads(threads):
        for batch in batch_sizes:
            repeated = tuple(repeat_batch(t, batch) for t in inputs)
            x = repeated if several else repeated[0]
            for _ in range(warmup):
                call(model, x)
            timer = Timer(stmt="call(model, x)", globals={"call": call, "model": model, "x": x}, num_threads=threads)
            times = np.asarray(timer.blocked_autorange(min_run_time=min_run_time).times, dtype=np.float64)
            median = float(np.median(times))
            results[batch] = {
                "median_ms": median * 1e3,
                "p90_ms": float(np.percentile(times, 90)) * 1e3,
                "throughput_per_s": batch / median,
                "runs": int(times.size),
            }
    return results

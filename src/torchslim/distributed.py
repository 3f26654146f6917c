"""Data-parallel helpers: torch.distributed under ``torchrun`` (gloo on CPU, NCCL on GPU), rank-0-only writes.

Launch any torchslim script or command with ``torchrun --nproc_per_node N ...``: :func:`torchslim.train`
sees ``WORLD_SIZE > 1`` in the environment, initialises the process group itself (:func:`init_from_env`)
and trains with DistributedDataParallel. Outside torchrun every helper answers as a single process
(rank 0 of 1), so code written with them runs unchanged in both settings.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchslim.artifact import save
from torchslim.errors import TorchSlimError

__all__ = [
    "all_reduce_sum",
    "barrier",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "save_on_main",
    "world_size",
]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints summaries.

    Before the process group exists, torchrun's ``RANK`` environment variable decides.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def barrier() -> None:
    """Wait until every process reaches this point (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, if it asks for more than one process.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo. (``train``
            passes the backend that fits its model's device: gloo for a CPU model.)

    Returns:
        True when this process is now part of a group of more than one process (also when the group
        was initialised before), False for a single process.

    Raises:
        TorchSlimError: ``WORLD_SIZE > 1`` but torch.distributed is unavailable, torchrun's variables
            (RANK, MASTER_ADDR, MASTER_PORT) are missing, or the backend cannot be used.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise TorchSlimError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    missing = [key for key in _ENV_KEYS if key not in os.environ]
    if missing:
        raise TorchSlimError(
            f"WORLD_SIZE = {os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
            "torchrun --nproc_per_node N ... (it sets them), or unset WORLD_SIZE for a single process"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise TorchSlimError(f"backend = {backend!r} is invalid: expected 'gloo' (CPU) or 'nccl' (GPU)")
    if backend == "nccl":
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise TorchSlimError("backend 'nccl' needs CUDA and an NCCL build of PyTorch; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    atexit.register(_destroy)
    return dist.get_world_size() > 1


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers over all processes (each process gets the totals; unchanged when not distributed).

    Args:
        values: this process's numbers.
        device: where the reduction runs (a CUDA device for NCCL).

    Returns:
        The element-wise sums, as floats (float64 reduction).
    """
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def save_on_main(model: torch.nn.Module, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``torchslim.save`` on rank 0 only; every process waits until the file is written.

    Use it in commands that may run under torchrun (train, distill): one writer, no torn files.

    Args:
        model: the (unwrapped) model to save.
        path: the ``.slim`` destination.
        **kwargs: passed to :func:`torchslim.artifact.save` (recipe, measurements, extra, factory).

    Returns:
        ``path`` as a ``Path`` (on every rank).
    """
    target = Path(path)
    if is_main_process():
        save(model, target, **kwargs)
    barrier()
    return target

"""The new process of the coverage table's save -> load check: ``python -m torchslim.coverage.reload SPEC``.

``SPEC`` is a safetensors file written by :func:`torchslim.coverage.runner._reload`: metadata ``paths`` (the
``.slim`` files, JSON) and tensors ``{i}.input.{k}`` / ``{i}.expected``. Each file is loaded with
``ts.load(path, trust_factory=True)`` and run on its inputs; prints one JSON line: a list of
``{"status": "ok"|"error"|"crash"|"wrong", "message": str}``, one per file.
"""

from __future__ import annotations

import json
import sys

import safetensors
import torch

from torchslim._utils import first_line
from torchslim.artifact import load
from torchslim.errors import TorchSlimError


def check(path: str, inputs: list[torch.Tensor], expected: torch.Tensor) -> dict[str, str]:
    """Load ``path`` and compare its outputs on ``inputs`` with ``expected`` (bit for bit)."""
    try:
        model = load(path, trust_factory=True)
        with torch.no_grad():
            got = model(*inputs)
    except TorchSlimError as exc:
        return {"status": "error", "message": first_line(exc)}
    except Exception as exc:  # noqa: BLE001 - reported as a bug in the table
        return {"status": "crash", "message": f"{type(exc).__name__}: {first_line(exc)}"}
    if not torch.equal(got, expected):
        diff = (got.double() - expected.double()).abs().max() if got.shape == expected.shape else "shape"
        return {"status": "wrong", "message": f"outputs differ after load in a new process (max abs {diff})"}
    return {"status": "ok", "message": ""}


def main(spec: str) -> None:
    with safetensors.safe_open(spec, "pt") as f:
        paths = json.loads(f.metadata()["paths"])
        # fresh (aligned) copies: kernels may take another path, rounded differently, on unaligned mmap'd memory
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    results = []
    for i, path in enumerate(paths):
        inputs = [tensors[f"{i}.input.{k}"] for k in range(len(tensors)) if f"{i}.input.{k}" in tensors]
        results.append(check(path, inputs, tensors[f"{i}.expected"]))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])

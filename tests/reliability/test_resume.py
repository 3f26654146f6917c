"""Long runs resume after a kill: QAT killed with SIGKILL mid-run and resumed equals an uninterrupted run.

(The plain training loop has the same test in tests/test_train.py; QAT goes through it with its own
learnable scales, which must be checkpointed and restored too.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchslim as ts
from torchslim.quantize.qat import qat
from torchslim.testing import blobs, tiny_mlp
from torchslim.train import TrainConfig

HERE = Path(__file__)
CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.01, checkpoint_every=3, seed=1)  # 8 steps per epoch
QUANT = ts.IntQuant(bits=3, granularity="group", group_size=8)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _start_model() -> torch.nn.Module:
    torch.manual_seed(4)
    return tiny_mlp()


def _child_main(path: str, kill_after: int) -> None:
    """Run in a subprocess: QAT that SIGKILLs its own process during step ``kill_after + 1``."""
    calls = [0]

    def loss_fn(model, inputs, targets):
        calls[0] += 1
        if calls[0] > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(model(inputs), targets)

    qat(_start_model(), blobs(), QUANT, CONFIG, checkpoint_path=path, loss_fn=loss_fn, progress=False)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_qat_resumed_after_sigkill_equals_uninterrupted(tmp_path):
    reference = _start_model()
    qat(reference, blobs(), QUANT, CONFIG, progress=False)

    path = tmp_path / "qat.ckpt"
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('child_test_resume', {str(HERE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module._child_main({str(path)!r}, 13)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 12  # checkpoints every 3 steps; step 14 never ran
    assert any(key.endswith("scale") for key in state["model"]), "QAT's learnable scales are checkpointed"

    resumed = _start_model()
    qat(resumed, blobs(), QUANT, CONFIG, checkpoint_path=path, resume=True, progress=False)
    expected, got = reference.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for key in expected:  # bit for bit (torch.equal would take -0.0 for +0.0)
        assert expected[key].dtype == got[key].dtype, key
        assert torch.equal(_bits(expected[key]), _bits(got[key])), (key, expected[key], got[key])
    x = blobs(n=16, seed=9).tensors[0]
    with torch.no_grad():
        assert torch.equal(reference(x), resumed(x))
    # and the converted model saves as the same file content
    a, b = ts.save(reference, tmp_path / "a.slim"), ts.save(resumed, tmp_path / "b.slim")
    assert a.read_bytes() == b.read_bytes()

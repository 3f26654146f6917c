"""Worker for tests/distill/test_ddp.py, launched by ``python -m torch.distributed.run --nproc_per_node N``.

Usage: ``ddp_worker.py OUT_DIR GLOBAL_BATCH``. Every rank trains the same tiny MLP through ``torchslim.train``
(batch GLOBAL_BATCH / world per rank, SGD without momentum), then runs ``torchslim train`` (the CLI) on an npz
file; rank 0 alone saves. Each rank writes OUT_DIR/rank{r}.json with what the test checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from torchslim import distributed
from torchslim.cli.main import main
from torchslim.testing import blobs, tiny_mlp
from torchslim.train import TrainConfig, train


def data() -> tuple[TensorDataset, TensorDataset]:
    x, y = blobs(n=128, num_classes=4, features=16, seed=0).tensors
    return TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])


def api_config(batch_size: int) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=batch_size, optimizer="sgd", momentum=0.0, lr=0.1, seed=0)


def cli_args(npz: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "train", "--model", "torchslim.models:student_mlp", "--data", f"npz:{npz}", "--epochs", "2",
        "--batch-size", str(batch_size), "--optimizer", "sgd", "--lr", "0.05", "--out", str(out),
        "--no-progress", "--json",
    ]  # fmt: skip


def distill_args(npz: Path, teacher: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "distill", "--teacher", str(teacher), "--student", "torchslim.models:student_mlp", "--data", f"npz:{npz}",
        "--epochs", "1", "--batch-size", str(batch_size), "--out", str(out), "--no-progress", "--json",
    ]  # fmt: skip


def write_npz(path: Path) -> None:
    (x, y), (xt, yt) = (d.tensors for d in data())
    np.savez(path, x=x.numpy(), y=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())


def main_worker(out: Path, global_batch: int) -> None:
    report: dict = {"env_main": distributed.is_main_process()}
    train_data, test_data = data()
    torch.manual_seed(0)
    model = tiny_mlp()
    result = train(
        model, train_data, api_config(global_batch // 2), eval_data=test_data, checkpoint_path=out / "ckpt.pt",
        progress=False,
    )  # fmt: skip
    world, rank = distributed.world_size(), distributed.rank()
    report.update(world=world, rank=rank, main=distributed.is_main_process())
    report.update(history=result.history, steps=result.steps)
    distributed.save_on_main(model, out / "api.slim", recipe=[{"stage": "train"}])

    # After train() the model is a plain module again: a backward stays local to this rank.
    model.zero_grad()
    x = torch.full((2, 1, 1, 16), float(rank + 1))
    model(x).sum().backward()
    report["grad_sum"] = float(model[1].weight.grad.sum())

    # Resume the 2-epoch checkpoint for a third epoch (every rank reads it; rank 0 rewrites it).
    resumed = tiny_mlp()
    again = train(
        resumed, train_data, api_config(global_batch // 2).replace(epochs=3), checkpoint_path=out / "ckpt.pt",
        resume=True, progress=False,
    )  # fmt: skip
    report.update(resumed_from=again.resumed_from, resumed_steps=again.steps)
    distributed.save_on_main(resumed, out / "resumed.slim")

    if rank == 0:
        write_npz(out / "data.npz")
    distributed.barrier()
    report["cli_code"] = main(cli_args(out / "data.npz", out / "cli.slim", global_batch // 2))
    report["distill_code"] = main(distill_args(out / "data.npz", out / "cli.slim", out / "distilled.slim",
                                               global_batch // 2))
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main_worker(Path(sys.argv[1]), int(sys.argv[2]))

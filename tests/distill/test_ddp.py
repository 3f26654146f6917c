"""Data-parallel training under the real torchrun launcher: 2 CPU processes (gloo) match one process.

One launch (``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py``) runs
``torchslim.train`` and the ``torchslim train`` command on every rank; the tests compare its files with the same
training done here in one process with twice the batch size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchslim as ts
from torchslim.cli.main import main
from torchslim.errors import TorchSlimError
from torchslim.testing import tiny_mlp

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as worker  # noqa: E402

GLOBAL_BATCH = 16
TOL = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(worker.__file__)), str(out), str(GLOBAL_BATCH),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, reports, done.stdout


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_two_gloo_ranks_train_the_same_weights_as_one_process_with_the_global_batch(launched):
    out, reports, _ = launched
    train_data, test_data = worker.data()
    torch.manual_seed(0)
    single = tiny_mlp()
    result = ts.train(single, train_data, worker.api_config(GLOBAL_BATCH), eval_data=test_data, progress=False)
    assert max_difference(ts.load(out / "api.slim"), single) < TOL
    for report in reports:
        assert report["world"] == 2 and report["steps"] == result.steps == 12  # 96 samples / 16 per step, 2 epochs
        # metrics are summed over ranks: the same history as the single process, on every rank
        for mine, theirs in zip(report["history"], result.history, strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=TOL)
            assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])
            assert mine["eval_accuracy"] == theirs["eval_accuracy"]


def test_rank_zero_alone_writes_and_the_checkpoint_holds_every_rank(launched):
    out, reports, stdout = launched
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["main"] for r in reports] == [True, False] and [r["env_main"] for r in reports] == [True, False]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["epoch"] == 3  # after the resume
    assert not torch.equal(state["ranks"][0]["rng"], state["ranks"][1]["rng"])  # each rank draws its own numbers
    assert stdout.count('"out":') == 1  # the CLI summary is printed once, by rank 0


def test_a_two_process_checkpoint_resumes_under_two_processes(launched):
    out, reports, _ = launched
    train_data, _ = worker.data()
    torch.manual_seed(0)
    single = tiny_mlp()
    ts.train(single, train_data, worker.api_config(GLOBAL_BATCH).replace(epochs=3), progress=False)
    assert [(r["resumed_from"], r["resumed_steps"]) for r in reports] == [(12, 18), (12, 18)]
    assert max_difference(ts.load(out / "resumed.slim"), single) < TOL


def test_after_training_the_model_is_plain_again(launched):
    _, reports, _ = launched
    # each rank's backward on its own input gives its own gradient: DDP's all-reduce hooks are gone
    assert reports[0]["grad_sum"] != pytest.approx(reports[1]["grad_sum"])


def test_cli_under_torchrun_matches_one_process(launched, tmp_path, capsys):
    out, reports, _ = launched
    assert [r["cli_code"] for r in reports] == [0, 0]
    single_path = tmp_path / "single.slim"
    assert main(worker.cli_args(out / "data.npz", single_path, GLOBAL_BATCH)) == 0
    assert json.loads(capsys.readouterr().out)["processes"] == 1
    assert max_difference(ts.load(out / "cli.slim"), ts.load(single_path)) < TOL
    assert ts.read_manifest(out / "cli.slim")["recipe"][0]["world_size"] == 2


def test_distill_cli_under_torchrun_writes_once_and_records_the_processes(launched):
    out, reports, _ = launched
    assert [r["distill_code"] for r in reports] == [0, 0]
    stage = ts.read_manifest(out / "distilled.slim")["recipe"][-1]
    assert stage["stage"] == "distill" and stage["world_size"] == 2
    assert not list(out.glob("*.tmp*"))  # rank 0 alone wrote: no second writer's leftovers


def test_resuming_a_two_process_checkpoint_in_one_process_is_refused(launched, tmp_path):
    out, _, _ = launched
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes((out / "ckpt.pt").read_bytes())
    train_data, _ = worker.data()
    config = worker.api_config(GLOBAL_BATCH // 2).replace(epochs=4)
    with pytest.raises(TorchSlimError, match=r"written by 2 process\(es\) but this run has 1.*--nproc_per_node 2"):
        ts.train(tiny_mlp(), train_data, config, checkpoint_path=checkpoint, resume=True, progress=False)

"""torchslim.distributed outside torchrun (single process), the shard rule, and ``python -m torchslim``.

The multi-process behaviour (2 gloo ranks under torchrun) is tested in tests/distill/test_ddp.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch.utils.data import DistributedSampler

import torchslim as ts
from torchslim import distributed
from torchslim.errors import TorchSlimError
from torchslim.testing import blobs, tiny_mlp
from torchslim.train import _shard

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_a_single_process_is_rank_zero_of_one(clean_env, tmp_path):
    assert not distributed.is_distributed()
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main_process()
    assert distributed.init_from_env() is False
    distributed.barrier()  # no-op
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    path = distributed.save_on_main(tiny_mlp(), tmp_path / "m.slim")
    assert ts.load(path) is not None


def test_torchrun_rank_decides_the_main_process_before_the_group_exists(clean_env):
    clean_env.setenv("RANK", "1")
    assert not distributed.is_main_process()
    clean_env.setenv("RANK", "0")
    assert distributed.is_main_process()


def test_world_size_without_torchrun_variables_is_a_clear_error(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    expected = "WORLD_SIZE = 2 but RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"
    with pytest.raises(TorchSlimError, match=expected):
        distributed.init_from_env()
    # train() joins the group itself, so it reports the same error before any step
    with pytest.raises(TorchSlimError, match="WORLD_SIZE = 2 but"):
        ts.train(tiny_mlp(), blobs(n=8), ts.TrainConfig(epochs=1), progress=False)


def test_unknown_backend_is_refused_before_joining(clean_env):
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        clean_env.setenv(key, value)
    with pytest.raises(TorchSlimError, match=r"backend = 'mpi' is invalid: expected 'gloo' \(CPU\) or 'nccl'"):
        distributed.init_from_env("mpi")


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (7, 3), (2, 4), (96, 2)])
def test_shards_follow_distributed_sampler(n, world):
    order = [(i * 7) % n for i in range(n)]  # any permutation: the shard applies to the epoch's shuffled order
    shards = [_shard(order, rank, world) for rank in range(world)]
    for rank, shard in enumerate(shards):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert shard == [order[i] for i in sampler]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    assert set().union(*shards) == set(order)
    assert _shard(order, 0, 1) is order


def test_python_dash_m_torchslim_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "torchslim", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("torchslim ")

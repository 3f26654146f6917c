import os
import re
import stat
import subprocess
import sys

import pytest

from torchslim.errors import TorchSlimError
from torchslim.fileio import (
    _host_tag,
    atomic_path,
    atomic_private_path,
    atomic_write_bytes,
    atomic_write_text,
    check_output_path,
    remove_stale_temp_files,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old content")
    atomic_write_text(target, "new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failure_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "model.slim"
    target.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model.slim"]


def test_atomic_path_keeps_the_suffix_writers_look_at(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".tmp" and tmp.name.endswith(".png.tmp")
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "plot.png").read_bytes() == b"x"


def test_private_path_takes_the_writers_own_temp_files_and_leaves_nothing(tmp_path):
    target = tmp_path / "model.slim"
    target.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_private_path(target) as tmp:
            (tmp.parent / ".tmpABC123").write_bytes(b"half")  # what safetensors' save_file writes first
            raise RuntimeError("boom")
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model.slim"]
    with atomic_private_path(target) as tmp:
        assert tmp.name == "model.slim" and tmp.parent.parent == tmp_path
        (tmp.parent / ".tmpABC123").write_bytes(b"new")
        os.replace(tmp.parent / ".tmpABC123", tmp)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.slim"]


@pytest.mark.skipif(os.name != "posix", reason="stale temp files are cleaned on POSIX only")
def test_next_write_removes_the_private_directory_of_a_killed_writer(tmp_path):
    target = tmp_path / "model.slim"
    stale = tmp_path / f".model.slim.{_host_tag()}-{_dead_pid()}.abcd_123.tmp"
    stale.mkdir()
    (stale / ".tmpXYZ").write_bytes(b"partial")
    atomic_write_bytes(target, b"complete")
    assert os.listdir(tmp_path) == ["model.slim"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TorchSlimError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "a.bin", b"x")


def test_check_output_path_refuses_overwrites_without_force(tmp_path):
    source = tmp_path / "in.slim"
    source.write_bytes(b"x")
    with pytest.raises(TorchSlimError, match="also an input"):
        check_output_path(source, source)
    other = tmp_path / "out.slim"
    assert check_output_path(other, source) == other
    other.write_bytes(b"y")
    with pytest.raises(TorchSlimError, match="already exists: pass --force"):
        check_output_path(other, source)
    assert check_output_path(other, source, force=True) == other
    assert check_output_path(source, source, force=True) == source


# --- leftovers of killed writers, permissions ------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name != "posix", reason="stale temp files are cleaned on POSIX only")
def test_next_write_removes_temp_files_of_killed_writers_only(tmp_path):
    target = tmp_path / "model.slim"
    host = _host_tag()
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".model.slim.{host}-{dead}.abcd_123.slim.tmp"
    keep = [
        tmp_path / f".model.slim.{host}-{alive}.abcd_123.slim.tmp",  # a live writer
        tmp_path / f".model.slim.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}.abcd_123.slim.tmp",  # other host
        tmp_path / f".other.slim.{host}-{dead}.abcd_123.slim.tmp",  # another destination
        tmp_path / ".model.slim.abcd_123.slim.tmp",  # not our pattern
        tmp_path / "notes.txt",
    ]
    for file in [stale, *keep]:
        file.write_bytes(b"partial")
    atomic_write_bytes(target, b"complete")
    assert target.read_bytes() == b"complete"
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [target, *keep])
    assert remove_stale_temp_files(target) == []


def test_temp_file_names_carry_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "a.onnx") as tmp:
        assert re.fullmatch(rf"\.a\.onnx\.{_host_tag()}-{os.getpid()}\.[a-z0-9_]{{8}}\.onnx\.tmp", tmp.name)
        tmp.write_bytes(b"x")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_file_gets_umask_default_and_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        fresh = atomic_write_bytes(tmp_path / "new.slim", b"x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640  # not mkstemp's 0600
        existing = tmp_path / "shared.slim"
        existing.write_bytes(b"old")
        existing.chmod(0o664)
        atomic_write_bytes(existing, b"new")
        assert stat.S_IMODE(existing.stat().st_mode) == 0o664
    finally:
        os.umask(old)

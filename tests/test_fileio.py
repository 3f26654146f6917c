import os

import pytest

from torchslim.errors import TorchSlimError
from torchslim.fileio import atomic_path, atomic_write_bytes, atomic_write_text, check_output_path


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

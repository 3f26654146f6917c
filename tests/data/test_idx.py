"""IDX files (MNIST format): the reader, the ``mnist:``/``fashion-mnist:`` specs and corrupt files."""

from __future__ import annotations

import gzip
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from torchslim.data import load_data
from torchslim.data.idx import read_idx
from torchslim.errors import DataError

CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}
NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX independently of the reader: header, big-endian dims, big-endian data."""
    header = bytes([0, 0, CODES[array.dtype.name], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_dir(root: Path, *, n_train=6, n_test=4, size=(28, 28), gz=(), labels_max=9, seed=0):
    """Write the four MNIST files (those named in ``gz`` compressed); return the source arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_y": rng.integers(0, labels_max + 1, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_y": rng.integers(0, labels_max + 1, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write(root / (NAMES[key] + (".gz" if key in gz else "")), idx_bytes(array))
    return arrays


# --- read_idx --------------------------------------------------------------------------------------------
def test_hand_written_uint8_file(tmp_path):
    data = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 2, 3) + bytes(range(12))
    array = read_idx(write(tmp_path / "a-idx3-ubyte", data))
    np.testing.assert_array_equal(array, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    assert array.dtype == np.uint8


def test_hand_written_big_endian_int16_and_float32(tmp_path):
    ints = read_idx(write(tmp_path / "i16", b"\x00\x00\x0b\x01\x00\x00\x00\x02\x01\x02\xff\xfe"))
    np.testing.assert_array_equal(ints, np.array([258, -2], dtype=np.int16))
    floats = read_idx(write(tmp_path / "f32", b"\x00\x00\x0d\x01\x00\x00\x00\x01\x3f\xc0\x00\x00"))
    assert floats.dtype == np.float32 and floats.tolist() == [1.5]


def test_result_is_native_endian_and_writable(tmp_path):
    array = read_idx(write(tmp_path / "w.gz", idx_bytes(np.array([[1, 2]], dtype=np.int32))))
    assert array.dtype.isnative and array.flags.writeable
    array[0, 0] = 5  # would raise on a read-only buffer view
    assert array.tolist() == [[5, 2]]


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.dtype(name) for name in CODES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    compressed=st.booleans(),
)
def test_round_trip_random_arrays(array, compressed):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / ("a.gz" if compressed else "a"), idx_bytes(array))
        back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "magic number 0x01000801; expected an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "type byte 0x07; expected one of 0x08"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "has 2 bytes; expected an IDX header"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "expected at least 16 for the header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", r"has 10 bytes; expected 11 .*file truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", r"has 10 bytes; expected 9 .*trailing data"),
    ],
)
def test_corrupt_files_name_the_path(tmp_path, data, expected):
    path = write(tmp_path / "bad-idx", data)
    with pytest.raises(DataError, match=re.escape(repr(str(path))) + ".*" + expected):
        read_idx(path)


def test_broken_gzip_names_the_path(tmp_path):
    whole = gzip.compress(idx_bytes(np.zeros((4, 5), dtype=np.uint8)))
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    for path in (truncated, not_gzip):
        with pytest.raises(DataError, match=re.escape(repr(str(path))) + ".*expected a gzip-compressed IDX"):
            read_idx(path)


# --- mnist: / fashion-mnist: -------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [(), tuple(NAMES), ("train_x", "test_y")], ids=["plain", "gz", "mixed"])
def test_mnist_directory_round_trip(tmp_path, gz):
    source = make_dir(tmp_path / "mnist", gz=gz)
    data = load_data(f"mnist:{tmp_path / 'mnist'}")
    for split, dataset in (("train", data.train), ("test", data.test)):
        x, y = dataset.tensors
        expected = (torch.from_numpy(source[f"{split}_x"]).float() / 255 - 0.1307) / 0.3081
        assert x.dtype == torch.float32 and x.shape == (len(expected), 1, 28, 28)
        torch.testing.assert_close(x[:, 0], expected)
        assert y.dtype == torch.int64 and y.tolist() == source[f"{split}_y"].tolist()
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert data.mean == (0.1307,) and data.std == (0.3081,)


def test_fashion_mnist_uses_its_own_statistics_and_any_image_size(tmp_path):
    source = make_dir(tmp_path, size=(5, 7))
    data = load_data(f"fashion-mnist:{tmp_path}")
    expected = (torch.from_numpy(source["test_x"]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(data.test.tensors[0][:, 0], expected)
    assert data.input_shape == (1, 5, 7)


def test_split_arguments_do_not_change_a_fixed_split(tmp_path):
    make_dir(tmp_path)
    a = load_data(f"mnist:{tmp_path}", seed=1, test_fraction=0.5)
    b = load_data(f"mnist:{tmp_path}", seed=2, test_fraction=0.1)
    assert len(a.test) == 4 and torch.equal(a.test.tensors[0], b.test.tensors[0])


def test_labels_above_nine_widen_num_classes(tmp_path):
    source = make_dir(tmp_path, n_train=40, labels_max=13)
    assert source["train_y"].max() == 13
    assert load_data(f"mnist:{tmp_path}").num_classes == 14


def _spec_error(spec: str, *fragments: str):
    pattern = ".*".join(re.escape(f) for f in (f"data spec {spec!r}: ", *fragments))
    with pytest.raises(DataError, match=pattern):
        load_data(spec)


def test_missing_directory_and_files(tmp_path):
    _spec_error(f"mnist:{tmp_path / 'nope'}", repr(str(tmp_path / "nope")), "does not exist")
    make_dir(tmp_path)
    (tmp_path / NAMES["test_y"]).unlink()
    (tmp_path / NAMES["train_x"]).unlink()
    lacking = f"lacks {NAMES['train_x']}, {NAMES['test_y']} (or .gz)"
    _spec_error(f"mnist:{tmp_path}", lacking, "expected the four")


def test_corrupt_file_in_directory_names_spec_and_path(tmp_path):
    make_dir(tmp_path)
    path = tmp_path / NAMES["train_x"]
    path.write_bytes(path.read_bytes()[:-1])
    _spec_error(f"mnist:{tmp_path}", repr(str(path)), "file truncated?")
    path.write_bytes(b"\x08\x08" + path.read_bytes()[2:])
    _spec_error(f"mnist:{tmp_path}", repr(str(path)), "magic number 0x0808")


def test_image_and_label_counts_must_agree(tmp_path):
    make_dir(tmp_path)
    labels = tmp_path / NAMES["train_y"]
    labels.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    spec = f"mnist:{tmp_path}"
    _spec_error(spec, "has 6 images but", repr(str(labels)), "has 5 labels; expected one label")


@pytest.mark.parametrize(
    "key, array, expected",
    [
        ("train_y", np.zeros((6, 1), dtype=np.uint8), "expected 1-D integer class labels"),
        ("train_y", np.zeros(6, dtype=np.float32), "expected 1-D integer class labels"),
        ("train_y", np.full(6, -1, dtype=np.int8), "negative label -1"),
        ("train_x", np.zeros((6, 784), dtype=np.uint8), "expected images (N, rows, cols)"),
        ("train_x", np.full((6, 28, 28), np.nan, dtype=np.float32), "NaN/Inf"),
        ("test_x", np.zeros((4, 14, 14), dtype=np.uint8), "test images are (14, 14); expected the same"),
    ],
)
def test_wrong_contents(tmp_path, key, array, expected):
    make_dir(tmp_path)
    (tmp_path / NAMES[key]).write_bytes(idx_bytes(array))
    _spec_error(f"mnist:{tmp_path}", expected)


def test_empty_files(tmp_path):
    make_dir(tmp_path, n_test=0)
    _spec_error(f"mnist:{tmp_path}", "holds no images; expected at least one")


def test_float_images_are_not_rescaled(tmp_path):
    make_dir(tmp_path)
    images = np.full((6, 28, 28), 0.5, dtype=np.float32)
    (tmp_path / NAMES["train_x"]).write_bytes(idx_bytes(images))
    x = load_data(f"mnist:{tmp_path}").train.tensors[0]
    torch.testing.assert_close(x, torch.full_like(x, (0.5 - 0.1307) / 0.3081))

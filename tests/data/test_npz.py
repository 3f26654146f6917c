"""``npz:FILE`` data: array layouts, scaling, given or stratified splits, and the errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from torchslim.data import load_data
from torchslim.errors import DataError


def save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def balanced_labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


def expect_error(spec: str, *fragments: str, **kwargs) -> DataError:
    pattern = ".*".join(re.escape(f) for f in (f"data spec {spec!r}: ", *fragments))
    with pytest.raises(DataError, match=pattern) as info:
        load_data(spec, **kwargs)
    return info.value


@pytest.mark.parametrize(
    "shape, sample_shape",
    [((30, 5, 6), (1, 5, 6)), ((30, 3, 4, 4), (3, 4, 4)), ((30, 12), (12,))],
    ids=["NHW", "NCHW", "flat"],
)
def test_layouts_and_stratified_split(tmp_path, shape, sample_shape):
    x = np.random.default_rng(0).normal(size=shape)
    y = balanced_labels(30)
    spec = save(tmp_path / "d.npz", x=x, y=y)
    data = load_data(spec, test_fraction=0.2)
    assert data.input_shape == sample_shape and data.num_classes == 3 and data.spec == spec
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert len(x_train) == 24 and len(x_test) == 6
    assert np.bincount(y_test.numpy()).tolist() == [2, 2, 2]
    # Float data is kept as is (no normalisation): each sample is a row of the source, with its label.
    flat_source = torch.from_numpy(x.astype(np.float32)).reshape(30, -1)
    for xs, ys in ((x_train, y_train), (x_test, y_test)):
        for sample, label in zip(xs.reshape(len(xs), -1), ys, strict=True):
            row = int((flat_source - sample).abs().sum(dim=1).argmin())
            assert torch.equal(flat_source[row], sample) and y[row] == int(label)
    assert data.mean is None and data.std is None


def test_uint8_is_scaled_to_unit_range(tmp_path):
    x = np.arange(20 * 4, dtype=np.uint8).reshape(20, 4) * 3
    spec = save(tmp_path / "u8.npz", x=x, y=balanced_labels(20, 2))
    data = load_data(spec)
    both = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    assert float(both.max()) == pytest.approx(237 / 255) and float(both.min()) == 0.0
    assert sorted((both * 255).round().flatten().tolist()) == sorted(x.flatten().astype(float).tolist())


def test_given_test_split_is_used_verbatim(tmp_path):
    x, y = np.ones((10, 2, 3), np.float32), np.array([0, 1] * 5)
    x_test, y_test = np.full((4, 2, 3), 2.0, np.float32), np.array([4, 0, 1, 0])
    spec = save(tmp_path / "s.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    data = load_data(spec, seed=5, test_fraction=0.5)
    assert torch.equal(data.train.tensors[0], torch.ones(10, 1, 2, 3))
    assert torch.equal(data.test.tensors[0], torch.full((4, 1, 2, 3), 2.0))
    assert data.test.tensors[1].tolist() == [4, 0, 1, 0] and data.train.tensors[1].tolist() == y.tolist()
    assert data.num_classes == 5  # the largest label in either split + 1


def test_split_is_deterministic_per_seed(tmp_path):
    spec = save(tmp_path / "r.npz", x=np.arange(40.0).reshape(40, 1), y=balanced_labels(40, 4))
    a, b, c = load_data(spec, seed=1), load_data(spec, seed=1), load_data(spec, seed=2)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.npz"
    expect_error(f"npz:{missing}", repr(str(missing)), "does not exist; expected an .npz archive")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    expect_error(f"npz:{garbage}", "cannot read", repr(str(garbage)), "expected an .npz archive")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    expect_error(f"npz:{single}", "holds a single array; expected an .npz archive")


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    spec = save(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    expect_error(spec, "cannot read the arrays", "expected plain numeric arrays")


def test_label_count_mismatch_message(tmp_path):
    path = tmp_path / "a.npz"
    spec = save(path, x=np.zeros((100, 4)), y=np.zeros(90, dtype=np.int64))
    error = expect_error(spec)
    assert str(error) == (
        f"data spec 'npz:{path}': array 'y' has 90 entries but 'x' has 100; expected one label per sample"
    )


@pytest.mark.parametrize(
    "arrays, fragments",
    [
        ({"x": np.zeros((4, 2))}, ("lacks ['y']", "expected 'x' and 'y'")),
        ({"y": np.zeros(4, int)}, ("lacks ['x']",)),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "x_test": np.zeros((2, 2))}, ("only one of",)),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, ("'y' has dtype float64; expected integer class",)),
        ({"x": np.zeros((4, 2)), "y": np.zeros((4, 1), int)}, ("'y' has shape (4, 1); expected a 1-D",)),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, ("negative label -1",)),
        ({"x": np.zeros(4), "y": np.zeros(4, int)}, ("'x' has shape (4,); expected (N, D)",)),
        ({"x": np.zeros((4, 1, 1, 2, 2)), "y": np.zeros(4, int)}, ("expected (N, D), (N, H, W)",)),
        ({"x": np.array([["a"]] * 4), "y": np.zeros(4, int)}, ("'x' has dtype <U1; expected numbers",)),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, int)}, ("'x' has 0 samples; expected at least one",)),
        ({"x": np.array([[0.0], [np.nan], [np.inf], [1.0]]), "y": np.zeros(4, int)}, ("2 NaN/Inf",)),
        ({"x": np.array([[0.0], [1e300], [2.0], [1.0]]), "y": np.zeros(4, int)}, ("values beyond +-3.403e",)),
        (
            {"x": np.zeros((4, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 4)),
             "y_test": np.zeros(2, int)},
            ("'x_test' has samples of shape (4,) but 'x' has (3,)",),
        ),
        (
            {"x": np.zeros((4, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3)),
             "y_test": np.zeros(3, int)},
            ("'y_test' has 3 entries but 'x_test' has 2",),
        ),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 0, 1, 1, 2])}, ("class 2 has a single sample",)),
    ],
)
def test_bad_arrays(tmp_path, arrays, fragments):
    expect_error(save(tmp_path / "bad.npz", **arrays), *fragments)


def test_npz_takes_no_options(tmp_path):
    spec = save(tmp_path / "o.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1])) + "?size=3"
    expect_error(spec, "'npz' takes no options; expected npz:FILE")

"""Spec parsing, argument checks and the ``DataSplits`` helpers (loaders, example inputs)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchslim.data as data_pkg
from torchslim.data import DataSplits, load_data, parse_spec
from torchslim.errors import DataError


def test_public_names():
    assert sorted(data_pkg.__all__) == ["DataSplits", "load_data", "parse_spec"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("digits", ("digits", None, {})),
        ("  DIGITS ", ("digits", None, {})),
        ("mnist:/data/mnist", ("mnist", "/data/mnist", {})),
        ("fashion-mnist:rel/dir", ("fashion-mnist", "rel/dir", {})),
        ("npz:C:\\data\\a.npz", ("npz", "C:\\data\\a.npz", {})),
        ("imagefolder:/pets?size=32&channels=3", ("imagefolder", "/pets", {"size": "32", "channels": "3"})),
        ("imagefolder:/pets?", ("imagefolder", "/pets", {})),
        ("imagefolder:/pets?size= 16 &", ("imagefolder", "/pets", {"size": "16"})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@given(
    kind=st.sampled_from(["mnist", "fashion-mnist", "npz", "imagefolder"]),
    argument=st.text(alphabet=st.characters(blacklist_characters="?", blacklist_categories=("Cs", "Z", "Cc")),
                     min_size=1, max_size=30),
)
def test_parse_spec_keeps_any_argument_without_question_mark(kind, argument):
    assert parse_spec(f"{kind}:{argument}") == (kind, argument, {})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "is empty or not a string; expected one of digits, mnist:DIR"),
        ("   ", "is empty or not a string"),
        ("cifar:/x", "unknown kind 'cifar'; expected one of digits, mnist:DIR, fashion-mnist:DIR, npz:FILE"),
        ("/data/a.npz", "unknown kind '/data/a.npz'"),
        ("npz:", "missing the file; expected npz:FILE"),
        ("npz", "missing the file; expected npz:FILE"),
        ("mnist:  ", "missing the directory; expected mnist:DIR"),
        ("imagefolder:?size=3", "missing the directory; expected imagefolder:DIR"),
        ("digits:", "'digits' takes no argument; expected digits"),
        ("mnist:/d?size=3", "'mnist' takes no options; expected mnist:DIR"),
        ("imagefolder:/d?=3", "option '=3' is malformed"),
    ],
)
def test_parse_errors_name_the_spec(spec, message):
    with pytest.raises(DataError, match=re.escape(f"data spec {spec!r}") + ".*" + re.escape(message)):
        parse_spec(spec)
    with pytest.raises(DataError, match=re.escape(message)):
        load_data(spec)


def test_non_string_spec():
    with pytest.raises(DataError, match="data spec None is empty or not a string"):
        load_data(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), float("inf"), "0.2", True])
def test_test_fraction_outside_open_unit_interval(fraction):
    message = f"data spec 'digits': test_fraction {fraction!r} is invalid; expected a number in (0, 1)"
    with pytest.raises(DataError, match=re.escape(message)):
        load_data("digits", test_fraction=fraction)


def test_test_fraction_is_checked_even_when_unused(tmp_path):
    spec = f"npz:{tmp_path / 'a.npz'}"
    with pytest.raises(DataError, match=re.escape(f"data spec {spec!r}: test_fraction 1.0 is invalid")):
        load_data(spec, test_fraction=1.0)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", None])
def test_bad_seed(seed):
    with pytest.raises(DataError, match=re.escape(f"data spec 'digits': seed {seed!r} is invalid")):
        load_data("digits", seed=seed)


def test_numpy_scalars_are_accepted():
    data = load_data("digits", seed=np.int64(0), test_fraction=np.float64(0.2))
    assert torch.equal(data.test.tensors[1], load_data("digits").test.tensors[1])


# --- DataSplits ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


def test_repr_is_short(digits):
    assert repr(digits) == (
        "DataSplits(spec='digits', train=1437, test=360, num_classes=10, input_shape=(1, 28, 28))"
    )


def labels_in_order(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_without_shuffle_keeps_order_and_batches(digits):
    loader = digits.loader("test", batch_size=100)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([x for x, _ in batches]), digits.test.tensors[0])
    assert labels_in_order(digits.loader("train")) == digits.train.tensors[1].tolist()


def test_shuffle_is_reproducible_per_seed(digits):
    first = labels_in_order(digits.loader("train", shuffle=True, seed=7))
    again = labels_in_order(digits.loader("train", shuffle=True, seed=7))
    other = labels_in_order(digits.loader("train", shuffle=True, seed=8))
    assert first == again and first != other
    in_order = digits.train.tensors[1].tolist()
    assert first != in_order and sorted(first) == sorted(in_order)
    # Epochs of one loader differ from each other, and the sequence of epochs repeats with the seed.
    a, b = digits.loader("train", shuffle=True, seed=7), digits.loader("train", shuffle=True, seed=7)
    epochs_a = [labels_in_order(a) for _ in range(2)]
    assert epochs_a[0] != epochs_a[1] and epochs_a == [labels_in_order(b) for _ in range(2)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "val"}, "split 'val' is invalid; expected 'train' or 'test'"),
        ({"batch_size": 0}, "batch_size 0 is invalid; expected an integer >= 1"),
        ({"batch_size": 2.0}, "batch_size 2.0 is invalid"),
    ],
)
def test_loader_errors(digits, kwargs, message):
    with pytest.raises(DataError, match=re.escape(f"data spec 'digits': {message}")):
        digits.loader(**kwargs)


def test_example_inputs_are_first_test_images(digits):
    x = digits.example_inputs(4)
    assert x.shape == (4, 1, 28, 28) and torch.equal(x, digits.test.tensors[0][:4])
    x.zero_()  # a copy: the data set is untouched
    assert float(digits.test.tensors[0][:4].abs().sum()) > 0
    assert digits.example_inputs().shape == (1, 1, 28, 28)
    assert digits.example_inputs(360).shape[0] == 360


@pytest.mark.parametrize("batch_size", [0, 361, 1.0])
def test_example_inputs_errors(digits, batch_size):
    message = f"example batch_size {batch_size!r} is invalid; expected an integer in [1, 360]"
    with pytest.raises(DataError, match=re.escape(f"data spec 'digits': {message}")):
        digits.example_inputs(batch_size)

"""The embedded ``digits`` data set: shapes, split, stratification, determinism, normalisation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from torchslim.data import load_data
from torchslim.errors import DataError

CLASS_COUNTS = np.bincount(load_digits().target)


def test_shapes_dtypes_and_split_sizes():
    data = load_data("digits")
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.shape == (1437, 1, 28, 28) and x_test.shape == (360, 1, 28, 28)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28) and data.spec == "digits"
    assert load_data().spec == "digits"  # the default spec


def test_split_is_stratified_and_covers_every_image_once():
    data = load_data("digits")
    train_counts = np.bincount(data.train.tensors[1].numpy(), minlength=10)
    test_counts = np.bincount(data.test.tensors[1].numpy(), minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, CLASS_COUNTS)
    # Stratification keeps each class's test share within one sample of 20%.
    assert np.all(np.abs(test_counts - 0.2 * CLASS_COUNTS) <= 1)
    # Train and test are disjoint: their raw images, matched by content, never coincide.
    raw = torch.cat([data.train.tensors[0], data.test.tensors[0]]).flatten(1)
    assert torch.unique(raw, dim=0).shape[0] == len(np.unique(load_digits().data, axis=0))


@pytest.mark.parametrize("fraction, n_test", [(0.1, 180), (0.5, 899)])
def test_other_test_fractions(fraction, n_test):
    data = load_data("digits", test_fraction=fraction)
    assert len(data.test) == n_test and len(data.train) == 1797 - n_test


def test_same_seed_gives_identical_tensors_other_seed_differs():
    a, b = load_data("digits", seed=3), load_data("digits", seed=3)
    for left, right in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors, strict=True):
        assert torch.equal(left, right)
    c = load_data("digits", seed=4)
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])


def test_normalised_with_train_statistics():
    data = load_data("digits")
    x_train, x_test = data.train.tensors[0], data.test.tensors[0]
    assert abs(float(x_train.mean())) < 1e-5
    assert float(x_train.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    # The stored statistics undo the normalisation of both splits back to [0, 1] pixels.
    (mean,), (std,) = data.mean, data.std
    assert 0.2 < mean < 0.4 and 0.2 < std < 0.5
    for x in (x_train, x_test):
        pixels = x * std + mean
        assert float(pixels.min()) == pytest.approx(0.0, abs=1e-5)
        assert float(pixels.max()) == pytest.approx(1.0, abs=1e-5)
    # Test statistics are not forced to 0/1: they come from the train split.
    assert float(x_test.mean()) != pytest.approx(0.0, abs=1e-6)


def test_images_are_bilinear_upscales_of_the_sklearn_digits():
    data = load_data("digits")
    bunch = load_digits()
    (mean,), (std,) = data.mean, data.std
    pixels = data.test.tensors[0][:5] * std + mean
    labels = data.test.tensors[1][:5]
    small = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    for image, label in zip(pixels, labels, strict=True):
        distance = (big - image).flatten(1).abs().max(dim=1).values
        match = int(distance.argmin())
        assert float(distance[match]) < 1e-5
        assert int(bunch.target[match]) == int(label)


def test_callers_cannot_corrupt_the_cache():
    first = load_data("digits")
    first.train.tensors[0].zero_()
    first.test.tensors[1].fill_(7)
    again = load_data("digits")
    assert float(again.train.tensors[0].abs().sum()) > 0
    assert len(torch.unique(again.test.tensors[1])) == 10


@pytest.mark.parametrize("spec", ["digits:extra", "digits?size=3"])
def test_digits_rejects_arguments(spec):
    with pytest.raises(DataError, match=re.escape(f"data spec {spec!r}: ") + ".*expected digits"):
        load_data(spec)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_that_cannot_hold_every_class_is_rejected(fraction):
    with pytest.raises(DataError, match=r"data spec 'digits': test_fraction=.*at least one sample of each"):
        load_data("digits", test_fraction=fraction)

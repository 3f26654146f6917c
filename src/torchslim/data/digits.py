"""The embedded data set: scikit-learn's bundled handwritten digits, shaped like MNIST.

1,797 real 8x8 images (values 0..16) are scaled to [0, 1], upscaled to 1x28x28 with bilinear
interpolation, split with a stratified seeded split and standardised with train-split statistics.
Nothing is downloaded.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from torchslim.data.common import Arrays, normalise_by_train, stratified_split
from torchslim.errors import DataError

SIZE = 28
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn is slow to import

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=16)
def _cached(seed: int, test_fraction: float) -> Arrays:
    images, labels = _raw()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    x_train, x_test, mean, std = normalise_by_train(images[train_idx], images[test_idx])
    return Arrays(
        x_train=x_train,
        y_train=torch.from_numpy(labels[train_idx]),
        x_test=x_test,
        y_test=torch.from_numpy(labels[test_idx]),
        num_classes=NUM_CLASSES,
        mean=mean,
        std=std,
    )


def load(argument: str | None, options: dict[str, str], *, seed: int, test_fraction: float) -> Arrays:
    """Load the digits as two normalised splits of (N, 1, 28, 28) images.

    Args:
        argument: must be ``None`` (the spec is just ``digits``).
        options: must be empty.
        seed: seed of the stratified split.
        test_fraction: share of the 1,797 images in the test split.

    Returns:
        Fresh tensors (a cached result is copied, so callers may modify what they get).

    Raises:
        DataError: an argument or option was given, or the split is impossible.
    """
    if argument is not None or options:
        raise DataError("'digits' takes no argument or options; expected just 'digits'")
    return _cached(int(seed), float(test_fraction)).clone()

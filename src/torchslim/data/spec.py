"""Data specs (``digits``, ``mnist:DIR``, ``npz:FILE`` ...): parsing, dispatch and ``DataSplits``.

A spec is ``KIND``, ``KIND:ARGUMENT`` or ``KIND:ARGUMENT?name=value&name=value``. The argument is
everything between the first ``:`` and the first ``?``, so a path may contain ``:`` but not ``?``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchslim.data import digits, idx, imagefolder, npz
from torchslim.data.common import Arrays
from torchslim.errors import DataError

Loader = Callable[..., Arrays]


@dataclass(frozen=True)
class _Kind:
    load: Loader
    usage: str
    argument: str | None = "directory"  # what the argument names; None: takes no argument
    options: tuple[str, ...] = ()


_KINDS: dict[str, _Kind] = {
    "digits": _Kind(digits.load, "digits", argument=None),
    "mnist": _Kind(idx.load_mnist, "mnist:DIR"),
    "fashion-mnist": _Kind(idx.load_fashion_mnist, "fashion-mnist:DIR"),
    "npz": _Kind(npz.load, "npz:FILE", argument="file"),
    "imagefolder": _Kind(
        imagefolder.load, "imagefolder:DIR[?size=28&channels=1]", options=("size", "channels")
    ),
}
USAGE = ", ".join(kind.usage for kind in _KINDS.values())


@dataclass(repr=False)
class DataSplits:
    """A data set as train and test ``TensorDataset``s of (x float32, y int64).

    Attributes:
        train: training samples; x is (N, C, H, W), or (N, D) for flat vectors from ``npz``.
        test: held-out samples, same layout.
        num_classes: number of classes (labels are in ``[0, num_classes)``).
        input_shape: shape of one sample, ``x.shape[1:]``.
        spec: the spec string that produced the data.
        mean: per-channel values subtracted during normalisation (``None``: not normalised).
        std: per-channel divisors used during normalisation (``None``: not normalised).
        classes: class names in label order, where the source has them (image folders).
    """

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    spec: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = field(default=None)

    def __repr__(self) -> str:
        return (
            f"DataSplits(spec={self.spec!r}, train={len(self.train)}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )

    def _fail(self, message: str) -> DataError:
        return DataError(f"data spec {self.spec!r}: {message}")

    def loader(
        self, split: str = "train", batch_size: int = 64, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """Return a ``DataLoader`` over one split.

        Args:
            split: ``"train"`` or ``"test"``.
            batch_size: samples per batch (the last batch may be smaller).
            shuffle: reshuffle every epoch with a generator seeded by ``seed``; two loaders made
                with the same seed yield the same order, epoch by epoch.
            seed: seed of the shuffling generator.

        Returns:
            A single-process ``DataLoader`` yielding ``(x, y)`` batches.

        Raises:
            DataError: unknown split or a batch size below 1.
        """
        if split not in ("train", "test"):
            raise self._fail(f"split {split!r} is invalid; expected 'train' or 'test'")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise self._fail(f"batch_size {batch_size!r} is invalid; expected an integer >= 1")
        dataset = self.train if split == "train" else self.test
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """Return the first ``batch_size`` test inputs (a copy), for tracing, export and timing.

        Raises:
            DataError: ``batch_size`` is below 1 or larger than the test split.
        """
        x = self.test.tensors[0]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= len(x):
            raise self._fail(
                f"example batch_size {batch_size!r} is invalid; expected an integer in [1, {len(x)}] "
                "(the size of the test split)"
            )
        return x[:batch_size].clone()


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Split a data spec into its kind, argument and options.

    ``parse_spec("imagefolder:/data/pets?size=32")`` gives ``("imagefolder", "/data/pets", {"size": "32"})``;
    ``parse_spec("digits")`` gives ``("digits", None, {})``.

    Args:
        spec: the spec string; the kind is case-insensitive, surrounding spaces are ignored.

    Returns:
        ``(kind, argument or None, options)`` with option values as strings.

    Raises:
        DataError: empty spec, unknown kind, missing or unexpected argument, malformed, unknown or
            repeated options. The message names the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec {spec!r} is empty or not a string; expected one of {USAGE}")

    def fail(message: str) -> DataError:
        return DataError(f"data spec {spec!r}: {message}")

    body, has_query, query = spec.strip().partition("?")
    kind, has_colon, argument = body.partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS:
        raise fail(f"unknown kind {kind!r}; expected one of {USAGE}")
    entry = _KINDS[kind]
    argument = argument.strip() if has_colon else None
    if entry.argument is not None and not argument:
        raise fail(f"missing the {entry.argument}; expected {entry.usage}")
    if entry.argument is None and argument is not None:
        raise fail(f"{kind!r} takes no argument; expected {entry.usage}")
    options: dict[str, str] = {}
    for item in query.split("&") if has_query else ():
        if not item.strip():
            continue
        name, has_equals, value = item.partition("=")
        name = name.strip()
        if not has_equals or not name:
            raise fail(f"option {item!r} is malformed; expected name=value")
        if not entry.options:
            raise fail(f"{kind!r} takes no options; expected {entry.usage}")
        if name not in entry.options:
            raise fail(f"unknown option {name!r} for {kind!r}; expected one of {', '.join(entry.options)}")
        if name in options:
            raise fail(f"option {name!r} is given twice; expected it at most once")
        options[name] = value.strip()
    return kind, argument, options


def _check_split_args(spec: str, seed: int, test_fraction: float) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise DataError(f"data spec {spec!r}: seed {seed!r} is invalid; expected an integer in [0, 2**32)")
    ok = isinstance(test_fraction, (int, float, np.floating)) and not isinstance(test_fraction, bool)
    if not (ok and math.isfinite(test_fraction) and 0 < test_fraction < 1):
        raise DataError(
            f"data spec {spec!r}: test_fraction {test_fraction!r} is invalid; expected a number in (0, 1)"
        )


def _check_arrays(arrays: Arrays) -> None:
    """Guard the contract every loader promises (a failure here is a loader bug or odd data)."""
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        if len(x) == 0:
            raise DataError(f"the {split} split is empty; expected at least one sample")
        if x.dtype != torch.float32 or y.dtype != torch.int64 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"the {split} split has x {x.dtype} {tuple(x.shape)} and y {y.dtype} {tuple(y.shape)}; "
                "expected float32 samples and one int64 label each"
            )
        if int(y.min()) < 0 or int(y.max()) >= arrays.num_classes:
            raise DataError(f"the {split} split has labels outside [0, {arrays.num_classes})")
    if arrays.x_train.shape[1:] != arrays.x_test.shape[1:]:
        raise DataError(
            f"train samples are {tuple(arrays.x_train.shape[1:])} but test samples are "
            f"{tuple(arrays.x_test.shape[1:])}; expected the same shape"
        )


def load_data(spec: str = "digits", *, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """Load a data set named by a spec as train/test splits.

    Specs: ``digits`` (embedded, default), ``mnist:DIR``, ``fashion-mnist:DIR``, ``npz:FILE``,
    ``imagefolder:DIR[?size=28&channels=1]``.

    Args:
        spec: what to load.
        seed: seed of the stratified split, for sources without their own test split.
        test_fraction: share of samples in the test split, in (0, 1); validated for every spec
            but used only where the source has no test split.

    Returns:
        A :class:`DataSplits`; loading the same spec with the same arguments gives identical tensors.

    Raises:
        DataError: anything wrong with the spec, files or arguments; the message names the spec and
            says what was expected.
    """
    kind, argument, options = parse_spec(spec)
    _check_split_args(spec, seed, test_fraction)
    try:
        arrays = _KINDS[kind].load(argument, options, seed=int(seed), test_fraction=float(test_fraction))
        _check_arrays(arrays)
    except DataError as exc:
        raise DataError(f"data spec {spec!r}: {exc}") from exc
    return DataSplits(
        train=TensorDataset(arrays.x_train, arrays.y_train),
        test=TensorDataset(arrays.x_test, arrays.y_test),
        num_classes=arrays.num_classes,
        input_shape=tuple(arrays.x_train.shape[1:]),
        spec=spec,
        mean=arrays.mean,
        std=arrays.std,
        classes=arrays.classes,
    )

"""User data from a NumPy ``.npz`` archive: arrays ``x`` and ``y``, optionally ``x_test`` and ``y_test``."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from torchslim.data.common import Arrays, check_finite, stratified_split
from torchslim.errors import DataError

REQUIRED = ("x", "y")
OPTIONAL = ("x_test", "y_test")
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _features(array: np.ndarray, name: str) -> torch.Tensor:
    """Check and convert a sample array: (N, D) stays flat, (N, H, W) gains a channel dimension."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"array {name!r} has dtype {array.dtype}; expected numbers (uint8 pixels or floats)")
    if array.ndim not in (2, 3, 4):
        raise DataError(
            f"array {name!r} has shape {array.shape}; expected (N, D), (N, H, W) or (N, C, H, W)"
        )
    if len(array) == 0:
        raise DataError(f"array {name!r} has 0 samples; expected at least one")
    check_finite(array, f"array {name!r}")
    limit = float(np.finfo(np.float32).max)
    if array.dtype.kind == "f" and float(np.abs(array).max()) > limit:
        raise DataError(f"array {name!r} has values beyond +-{limit:.4g}; expected numbers that fit float32")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    x = torch.from_numpy(array.astype(np.float32) / np.float32(scale))
    return x.unsqueeze(1) if array.ndim == 3 else x


def _labels(array: np.ndarray, name: str, n: int, x_name: str) -> torch.Tensor:
    if array.dtype.kind not in "iu":
        raise DataError(
            f"array {name!r} has dtype {array.dtype}; expected integer class labels (e.g. y.astype(np.int64))"
        )
    if array.ndim != 1:
        raise DataError(f"array {name!r} has shape {array.shape}; expected a 1-D array of class labels")
    if len(array) != n:
        raise DataError(
            f"array {name!r} has {len(array)} entries but {x_name!r} has {n}; expected one label per sample"
        )
    if array.min() < 0:
        raise DataError(f"array {name!r} has negative label {int(array.min())}; expected class indices >= 0")
    return torch.from_numpy(array.astype(np.int64))


def _read(path: Path) -> dict[str, np.ndarray]:
    where = f"file {str(path)!r}"
    if not path.is_file():
        raise DataError(f"{where} does not exist; expected an .npz archive with arrays 'x' and 'y'")
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(
            f"cannot read {where} ({exc}); expected an .npz archive written by numpy.savez"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where} holds a single array; expected an .npz archive with arrays 'x' and 'y'")
    with archive:
        names = set(archive.files)
        missing = [k for k in REQUIRED if k not in names]
        if missing:
            raise DataError(
                f"{where} has arrays {sorted(names)} but lacks {missing}; "
                "expected 'x' and 'y' (optionally 'x_test' and 'y_test')"
            )
        if ("x_test" in names) != ("y_test" in names):
            raise DataError(f"{where} has only one of 'x_test'/'y_test'; expected both or neither")
        try:
            return {k: archive[k] for k in REQUIRED + OPTIONAL if k in names}
        except _READ_ERRORS as exc:
            raise DataError(
                f"cannot read the arrays of {where} ({exc}); expected plain numeric arrays"
            ) from exc


def load(argument: str | None, options: dict[str, str], *, seed: int, test_fraction: float) -> Arrays:
    """Load ``npz:FILE``: uint8 ``x`` is divided by 255, float ``x`` kept as is (not normalised).

    Args:
        argument: path of the ``.npz`` file.
        options: must be empty.
        seed: seed of the stratified split (used only without ``x_test``/``y_test``).
        test_fraction: share of samples in the test split (same condition).

    Returns:
        The two splits; ``num_classes`` is the largest label + 1.

    Raises:
        DataError: missing file or arrays, wrong dtypes or shapes, N mismatch, negative labels,
            NaN/Inf, or an impossible stratified split.
    """
    if options:
        raise DataError("'npz' takes no options; expected npz:FILE")
    if not argument:
        raise DataError("missing the file; expected npz:FILE")
    arrays = _read(Path(argument).expanduser())
    x = _features(arrays["x"], "x")
    y = _labels(arrays["y"], "y", len(x), "x")
    if "x_test" in arrays:
        x_test = _features(arrays["x_test"], "x_test")
        y_test = _labels(arrays["y_test"], "y_test", len(x_test), "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(
                f"array 'x_test' has samples of shape {tuple(x_test.shape[1:])} but 'x' has "
                f"{tuple(x.shape[1:])}; expected the same"
            )
        x_train, y_train = x, y
    else:
        train_idx, test_idx = stratified_split(y.numpy(), test_fraction, seed)
        train_t, test_t = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
        x_train, y_train, x_test, y_test = x[train_t], y[train_t], x[test_t], y[test_t]
    num_classes = int(torch.cat([y_train, y_test]).max()) + 1
    return Arrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes)

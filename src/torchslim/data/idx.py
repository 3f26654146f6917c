"""MNIST and Fashion-MNIST from IDX files (the format of the original distribution), plain or gzipped.

An IDX file is a header (2 zero bytes, a type byte, a dimension count), one big-endian uint32 per
dimension, then the values in big-endian C order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from torchslim.data.common import Arrays, check_finite, normalise_fixed
from torchslim.errors import DataError

# IDX type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# split -> (images file, labels file); each may also be present with a ".gz" suffix.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # BadGzipFile is an OSError; a truncated gzip stream ends in EOFError.
        kind = "a gzip-compressed IDX file" if path.suffix == ".gz" else "an IDX file"
        raise DataError(f"cannot read {str(path)!r} ({exc}); expected {kind}") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` suffix: gzip-compressed) into a native-endian array.

    Args:
        path: the file.

    Returns:
        A writable array with the file's dtype and shape.

    Raises:
        DataError: the file is unreadable, the header is not IDX, the type byte is unknown, or the
            length does not match the header (truncated or trailing data). The message names the path.
    """
    path = Path(path)
    data = _read_bytes(path)
    where = f"file {str(path)!r}"
    if len(data) < 4:
        raise DataError(f"{where} has {len(data)} bytes; expected an IDX header of at least 4 bytes")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{where} starts with magic number 0x{data[:4].hex()}; expected an IDX file "
            "(2 zero bytes, a type byte, a dimension count)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{where} has IDX type byte 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise DataError(f"{where} declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{where} has {len(data)} bytes; expected at least {header} for the header of a "
            f"{ndim}-dimensional IDX array (file truncated?)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        reason = "file truncated?" if len(data) < expected else "trailing data?"
        raise DataError(
            f"{where} has {len(data)} bytes; expected {expected} for a {dtype.name} array of shape "
            f"{tuple(dims)} ({reason})"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return values.reshape(dims).astype(dtype.newbyteorder("="))


def _locate(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing = []
    for names in FILES.values():
        for name in names:
            for candidate in (directory / name, directory / (name + ".gz")):
                if candidate.is_file():
                    found[name] = candidate
                    break
            else:
                missing.append(name)
    if missing:
        expected = ", ".join(n for pair in FILES.values() for n in pair)
        raise DataError(
            f"directory {str(directory)!r} lacks {', '.join(missing)} (or .gz); "
            f"expected the four IDX files {expected}"
        )
    return found


def _images(path: Path) -> torch.Tensor:
    array = read_idx(path)
    if array.ndim != 3:
        raise DataError(f"file {str(path)!r} holds shape {array.shape}; expected images (N, rows, cols)")
    check_finite(array, f"file {str(path)!r}")
    x = torch.from_numpy(array)
    # Only uint8 pixels have a known range; other types are taken as already scaled.
    x = x.float() / 255.0 if array.dtype == np.uint8 else x.float()
    return x.unsqueeze(1)


def _labels(path: Path) -> torch.Tensor:
    array = read_idx(path)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(
            f"file {str(path)!r} holds {array.dtype.name} of shape {array.shape}; "
            "expected 1-D integer class labels"
        )
    if array.size and array.min() < 0:
        raise DataError(f"file {str(path)!r} has negative label {int(array.min())}; expected labels >= 0")
    return torch.from_numpy(array.astype(np.int64))


def _split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = (files[name] for name in FILES[split])
    x, y = _images(image_file), _labels(label_file)
    if len(x) != len(y):
        raise DataError(
            f"file {str(image_file)!r} has {len(x)} images but {str(label_file)!r} has {len(y)} labels; "
            "expected one label per image"
        )
    if len(x) == 0:
        raise DataError(f"file {str(image_file)!r} holds no images; expected at least one")
    return x, y


def load_idx_dir(directory: str | os.PathLike, mean: float, std: float) -> Arrays:
    """Load the train (``train-*``) and test (``t10k-*``) IDX files of one directory.

    Args:
        directory: folder holding the four files, each plain or ``.gz``.
        mean: value subtracted after scaling uint8 pixels to [0, 1].
        std: divisor applied after subtracting ``mean``.

    Returns:
        Splits of shape (N, 1, rows, cols); ``num_classes`` is 10, or the largest label + 1 if larger.

    Raises:
        DataError: the directory or a file is missing or corrupt, counts differ, or image sizes differ.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"directory {str(root)!r} does not exist; expected a folder with the MNIST IDX files")
    files = _locate(root)
    x_train, y_train = _split(files, "train")
    x_test, y_test = _split(files, "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"train images are {tuple(x_train.shape[2:])} but test images are {tuple(x_test.shape[2:])}; "
            "expected the same size"
        )
    num_classes = max(10, int(torch.cat([y_train, y_test]).max()) + 1)
    mean_t, std_t = torch.tensor([mean]), torch.tensor([std])
    return Arrays(
        x_train=normalise_fixed(x_train, mean_t, std_t),
        y_train=y_train,
        x_test=normalise_fixed(x_test, mean_t, std_t),
        y_test=y_test,
        num_classes=num_classes,
        mean=(mean,),
        std=(std,),
    )


def _no_options(kind: str, argument: str | None, options: dict[str, str]) -> str:
    if options:
        raise DataError(f"'{kind}' takes no options; expected {kind}:DIR")
    if not argument:
        raise DataError(f"missing the directory; expected {kind}:DIR")
    return argument


def load_mnist(argument: str | None, options: dict[str, str], *, seed: int, test_fraction: float) -> Arrays:
    """Loader for ``mnist:DIR`` (normalised with mean 0.1307, std 0.3081; seed/test_fraction unused)."""
    return load_idx_dir(_no_options("mnist", argument, options), *MNIST_MEAN_STD)


def load_fashion_mnist(
    argument: str | None, options: dict[str, str], *, seed: int, test_fraction: float
) -> Arrays:
    """Loader for ``fashion-mnist:DIR`` (normalised with mean 0.2860, std 0.3530)."""
    return load_idx_dir(_no_options("fashion-mnist", argument, options), *FASHION_MNIST_MEAN_STD)

"""Images in class folders (``DIR/<class>/*.png``), with an optional ``DIR/train`` + ``DIR/test`` split.

Options after ``?`` in the spec: ``size`` (square side in pixels, default 28) and ``channels``
(1 = grayscale, the default, or 3 = RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchslim.data.common import Arrays, normalise_by_train, stratified_split
from torchslim.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_SIZE = 28
MAX_SIZE = 4096


def parse_options(options: dict[str, str]) -> tuple[int, int]:
    """Validate the ``size`` and ``channels`` options.

    Args:
        options: option strings from the spec (already limited to known names).

    Returns:
        ``(size, channels)``.

    Raises:
        DataError: a value is not an integer in range.
    """
    size_text = options.get("size", str(DEFAULT_SIZE))
    channels_text = options.get("channels", "1")
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_SIZE:
        raise DataError(f"option size={size_text!r} is invalid; expected an integer in [1, {MAX_SIZE}]")
    if channels_text not in ("1", "3"):
        raise DataError(f"option channels={channels_text!r} is invalid; expected 1 (grayscale) or 3 (RGB)")
    return size, int(channels_text)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def scan(directory: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """List class folders (sorted by name) and their image files.

    Args:
        directory: folder whose sub-folders are the classes.

    Returns:
        ``(class_names, [(image_path, class_index), ...])``, images sorted by name within a class.

    Raises:
        DataError: no class folders, or a class folder without images.
    """
    try:
        return _scan(directory)
    except OSError as exc:
        raise DataError(f"cannot list {str(directory)!r} ({exc}); expected a readable folder") from exc


def _scan(directory: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    classes = tuple(sorted(p.name for p in directory.iterdir() if p.is_dir() and _visible(p)))
    if not classes:
        raise DataError(
            f"directory {str(directory)!r} has no class folders; "
            f"expected {str(directory)}/<class>/<image>.png"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        images = sorted(
            p for p in (directory / name).iterdir()
            if p.is_file() and _visible(p) and p.suffix.lower() in EXTENSIONS
        )
        if not images:
            raise DataError(
                f"class folder {str(directory / name)!r} has no images; "
                f"expected {', '.join(EXTENSIONS)} files"
            )
        files.extend((path, label) for path in images)
    return classes, files


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Read one image as uint8 (channels, size, size): converted to L or RGB, resized bilinearly.

    Raises:
        DataError: Pillow cannot decode the file (the message names it).
    """
    from PIL import Image  # Pillow is imported only when image folders are used

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError; some corrupt PNG chunks surface as SyntaxError.
        raise DataError(f"cannot read image {str(path)!r} ({exc}); expected a PNG, JPEG or BMP file") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _read_all(files: list[tuple[Path, int]], size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = np.stack([read_image(path, size, channels) for path, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return torch.from_numpy(pixels).float() / 255.0, torch.from_numpy(labels)


def load(argument: str | None, options: dict[str, str], *, seed: int, test_fraction: float) -> Arrays:
    """Load ``imagefolder:DIR[?size=S&channels=C]`` as splits of (N, C, S, S) images.

    ``DIR/train`` and ``DIR/test`` are used as the split when both exist; otherwise the class folders
    of ``DIR`` are split with a stratified seeded split. Pixels are scaled to [0, 1], then
    standardised per channel with train-split statistics.

    Args:
        argument: the directory.
        options: ``size`` and ``channels`` strings.
        seed: seed of the stratified split (unused with train/test folders).
        test_fraction: share of images in the test split (same condition).

    Returns:
        The two splits; ``classes`` holds the folder names in label order.

    Raises:
        DataError: missing folders, no images, unreadable images, class folders that differ between
            train and test, bad options, or an impossible stratified split.
    """
    size, channels = parse_options(options)
    if not argument:
        raise DataError("missing the directory; expected imagefolder:DIR")
    root = Path(argument).expanduser()
    if not root.is_dir():
        raise DataError(f"directory {str(root)!r} does not exist; expected a folder of class folders")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        classes, train_files = scan(train_dir)
        test_classes, test_files = scan(test_dir)
        if test_classes != classes:
            raise DataError(
                f"class folders differ: {str(train_dir)!r} has {list(classes)} but {str(test_dir)!r} has "
                f"{list(test_classes)}; expected the same class names"
            )
        x_train, y_train = _read_all(train_files, size, channels)
        x_test, y_test = _read_all(test_files, size, channels)
    elif train_dir.is_dir() or test_dir.is_dir():
        present, absent = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise DataError(
            f"directory {str(root)!r} has a {present!r} folder but no {absent!r} folder; expected both "
            "(or class folders directly in it)"
        )
    else:
        classes, files = scan(root)
        x, y = _read_all(files, size, channels)
        train_idx, test_idx = stratified_split(y.numpy(), test_fraction, seed, class_names=classes)
        train_t, test_t = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
        x_train, y_train, x_test, y_test = x[train_t], y[train_t], x[test_t], y[test_t]
    x_train, x_test, mean, std = normalise_by_train(x_train, x_test)
    return Arrays(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=len(classes), mean=mean, std=std, classes=classes,
    )

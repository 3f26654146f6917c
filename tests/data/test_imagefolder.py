"""``imagefolder:DIR`` data: class folders, train/test folders, options, formats and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from torchslim.data import load_data
from torchslim.errors import DataError

CLASSES = ("cat", "dog", "emu")


def solid(path, value, size=(4, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def value_of(label: int, i: int) -> int:
    """Gray level that encodes the class (value // 50) and the image index."""
    return 50 * label + 5 * i + 10


def make_classes(root, per_class=5, ext=".png"):
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            solid(root / name / f"{i:02d}{ext}", value_of(label, i))
    return f"imagefolder:{root}"


def pixels(x: torch.Tensor, data) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 pixel values."""
    mean = torch.tensor(data.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(data.std).reshape(1, -1, 1, 1)
    return (x * std + mean) * 255


def expect_error(spec: str, *fragments: str) -> None:
    pattern = ".*".join(re.escape(f) for f in (f"data spec {spec!r}: ", *fragments))
    with pytest.raises(DataError, match=pattern):
        load_data(spec)


def test_class_folders_with_stratified_split(tmp_path):
    spec = make_classes(tmp_path)
    data = load_data(spec)
    assert data.classes == CLASSES and data.num_classes == 3 and data.input_shape == (1, 28, 28)
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert len(x_train) == 12 and sorted(y_test.tolist()) == [0, 1, 2]
    # Each image is solid; its gray level says which class folder it came from.
    for x, y in ((x_train, y_train), (x_test, y_test)):
        levels = pixels(x, data)
        assert torch.allclose(levels, levels[:, :, :1, :1].expand_as(levels), atol=1e-3)
        assert (levels[:, 0, 0, 0].round().long() // 50).tolist() == y.tolist()
    seen = sorted(pixels(torch.cat([x_train, x_test]), data)[:, 0, 0, 0].round().long().tolist())
    assert seen == sorted(value_of(c, i) for c in range(3) for i in range(5))
    assert abs(float(x_train.mean())) < 1e-5
    assert float(x_train.std(correction=0)) == pytest.approx(1, abs=1e-4)


def test_split_depends_only_on_seed(tmp_path):
    spec = make_classes(tmp_path, per_class=6)
    a, b, c = load_data(spec, seed=0), load_data(spec, seed=0), load_data(spec, seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_train_and_test_folders_are_used_as_the_split(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for label, name in enumerate(("a", "b")):
            for i in range(count):
                solid(tmp_path / split / name / f"{i}.png", value_of(label, i))
    data = load_data(f"imagefolder:{tmp_path}", test_fraction=0.5)
    assert data.classes == ("a", "b") and len(data.train) == 6 and len(data.test) == 4
    # Files are read in class order, then by name.
    assert data.test.tensors[1].tolist() == [0, 0, 1, 1]
    levels = pixels(data.test.tensors[0], data)[:, 0, 0, 0].round().long().tolist()
    assert levels == [value_of(0, 0), value_of(0, 1), value_of(1, 0), value_of(1, 1)]


def test_size_and_channels_options(tmp_path):
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for name, colour in colours.items():
        for i in range(3):
            solid(tmp_path / name / f"{i}.png", colour, size=(5, 9), mode="RGB")
    data = load_data(f"imagefolder:{tmp_path}?size=32&channels=3", test_fraction=0.34)
    assert data.input_shape == (3, 32, 32) and len(data.mean) == 3 and len(data.std) == 3
    for x, y in (data.train.tensors, data.test.tensors):
        rgb = pixels(x, data)[:, :, 16, 16].round().long()
        for colour, label in zip(rgb.tolist(), y.tolist(), strict=True):
            assert tuple(colour) == colours[data.classes[label]]
    gray = load_data(f"imagefolder:{tmp_path}?channels=1")
    levels = pixels(torch.cat([gray.train.tensors[0], gray.test.tensors[0]]), gray)[:, 0, 0, 0].round()
    assert sorted(set(levels.long().tolist())) == [29, 76]  # Pillow's L = 0.299 R + 0.587 G + 0.114 B


def test_images_are_resized_bilinearly(tmp_path):
    gradient = np.tile(np.arange(0, 250, 25, dtype=np.uint8), (6, 1))  # 6 rows x 10 columns
    for name in ("a", "b"):
        for i in range(2):
            path = tmp_path / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient).save(path)
    data = load_data(f"imagefolder:{tmp_path}?size=12", test_fraction=0.5)
    expected = np.asarray(Image.fromarray(gradient).resize((12, 12), Image.Resampling.BILINEAR), dtype=float)
    got = pixels(data.train.tensors[0], data)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_formats_and_ignored_entries(tmp_path):
    solid(tmp_path / "a" / "x.bmp", 40)
    solid(tmp_path / "a" / "y.PNG", 60)
    solid(tmp_path / "a" / "z.png", (80, 80, 80, 255), mode="RGBA")
    solid(tmp_path / "b" / "x.jpg", 200, size=(16, 16))
    solid(tmp_path / "b" / "y.jpeg", 220, size=(16, 16))
    solid(tmp_path / "b" / "z.png", (240, 255), mode="LA")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    solid(tmp_path / "a" / ".hidden.png", 1)
    solid(tmp_path / ".cache" / "c.png", 1)
    data = load_data(f"imagefolder:{tmp_path}", test_fraction=0.34)
    assert data.classes == ("a", "b") and len(data.train) + len(data.test) == 6
    levels = pixels(torch.cat([data.train.tensors[0], data.test.tensors[0]]), data)[:, 0, 14, 14]
    found = sorted(levels.round().long().tolist())
    assert found[:3] == [40, 60, 80]
    assert all(abs(a - b) <= 3 for a, b in zip(found[3:], [200, 220, 240], strict=True))  # JPEG is lossy


def test_missing_or_empty_folders(tmp_path):
    expect_error(f"imagefolder:{tmp_path / 'nope'}", repr(str(tmp_path / "nope")), "does not exist")
    expect_error(f"imagefolder:{tmp_path}", "has no class folders; expected")
    (tmp_path / "a").mkdir()
    solid(tmp_path / "b" / "0.png", 1)
    expect_error(f"imagefolder:{tmp_path}", repr(str(tmp_path / "a")), "has no images; expected .png")


def test_unreadable_images_are_named(tmp_path):
    make_classes(tmp_path, per_class=2)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"not really a png")
    spec = f"imagefolder:{tmp_path}"
    expect_error(spec, "cannot read image", repr(str(bad)), "expected a PNG, JPEG or BMP")
    whole = (tmp_path / "cat" / "00.png").read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    expect_error(spec, "cannot read image", repr(str(bad)))


def test_train_test_folders_must_agree(tmp_path):
    solid(tmp_path / "train" / "a" / "0.png", 1)
    expect_error(f"imagefolder:{tmp_path}", "has a 'train' folder but no 'test' folder")
    solid(tmp_path / "train" / "b" / "0.png", 1)
    solid(tmp_path / "test" / "a" / "0.png", 1)
    solid(tmp_path / "test" / "c" / "0.png", 1)
    spec = f"imagefolder:{tmp_path}"
    expect_error(spec, "has ['a', 'b'] but", "has ['a', 'c']; expected the same class names")


def test_single_image_class_cannot_be_split(tmp_path):
    make_classes(tmp_path, per_class=3)
    solid(tmp_path / "zebra" / "0.png", 1)
    expect_error(f"imagefolder:{tmp_path}", "class 'zebra' has a single sample", "separate test set")


@pytest.mark.parametrize(
    "query, fragments",
    [
        ("size=0", ("option size='0' is invalid; expected an integer in [1, 4096]",)),
        ("size=big", ("option size='big' is invalid",)),
        ("channels=2", ("option channels='2' is invalid; expected 1 (grayscale) or 3 (RGB)",)),
        ("colour=red", ("unknown option 'colour' for 'imagefolder'; expected one of size, channels",)),
        ("size=8&size=9", ("option 'size' is given twice",)),
        ("size", ("option 'size' is malformed; expected name=value",)),
    ],
)
def test_bad_options(tmp_path, query, fragments):
    make_classes(tmp_path, per_class=2)
    expect_error(f"imagefolder:{tmp_path}?{query}", *fragments)

"""A JPEG is decoded at the smallest DCT scale its crop allows; the crop is (nearly) the full decode's, a PNG's
exactly."""

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from kd_lib.data.imagefolder import DataError, decode_rgb, open_image
from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder
from kd_lib.data.transforms import CropTransform, dct_scale, random_resized_crop_box

HR = 64
#: The largest mean absolute difference, in [0, 1], allowed between a drafted crop and the full decode's: 2 % of
#: the range, about 5 of 255 levels. libjpeg's scaled inverse DCT low-passes the image with another kernel than
#: Pillow's antialiased bilinear resize, which makes 0.3 to 0.9 % on these images; shifting the crop by one
#: output pixel makes 7 to 12 %, and a box mapped by the drafted size instead of the scale (off by up to a
#: pixel of the drafted image) fails the test.
TOLERANCE = 0.02


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Colour cells of 16 px blended bilinearly, with a little per-pixel grain: edges a misplaced box shows."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR), float)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))


def encoded(image: Image.Image, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


def as_float(crop: torch.Tensor) -> torch.Tensor:
    return crop.float() / 255


def full_decode_crop(image: Image.Image, seed: int, train: bool, shift: int = 0) -> torch.Tensor:
    """The crop as it was made before drafting: torchvision's, on the whole decoded image; ``shift``: the
    training crop moved sideways by that many output pixels."""
    if not train:
        return torch.from_numpy(np.array(TF.center_crop(TF.resize(image, HR, antialias=True), [HR, HR])))
    rng = random.Random(seed)
    top, left, height, width = random_resized_crop_box(image.width, image.height, rng, (0.35, 1.0))
    step = round(shift * width / HR)
    left = left + step if left + step + width <= image.width else left - step
    image = TF.resized_crop(image, top, left, height, width, size=[HR, HR], antialias=True)
    if rng.random() < 0.5:
        image = TF.horizontal_flip(image)
    return torch.from_numpy(np.array(image))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[str, Path]:
    """Prepared data of JPEGs large enough for every scale at ``HR`` (landscape, portrait, one under 2 x ``HR``),
    and their source folder."""
    root = tmp_path_factory.mktemp("photos")
    sizes = [(701, 523), (523, 701), (1030, 1030), (100, 90)]
    for split in ("train", "val"):
        for label in range(2):
            folder = root / "src" / split / f"class{label}"
            folder.mkdir(parents=True)
            for number, (width, height) in enumerate(sizes):
                photo(width, height, seed=10 * label + number).save(folder / f"{number}.jpg", quality=90)
    prepare_imagefolder(str(root / "src"), str(root / "data"))
    return str(root / "data"), root / "src"


@pytest.mark.parametrize("train", [True, False])
def test_a_drafted_jpeg_crop_is_close_to_the_full_decode_and_to_nothing_else(photos, train):
    data, _ = photos
    transform = CropTransform(HR, 4, train=train)
    dataset = ShardedImageDataset(data, "train", transform)
    scales = set()
    for index in range(len(dataset)):
        raw, path = dataset.encoded(index)
        whole = decode_rgb(raw, path)
        for seed in range(8):
            scales.add(transform.draft(open_image(raw, path), seed).scale)
            crop, _ = dataset[index, seed]
            full = full_decode_crop(whole, seed, train)
            assert torch.equal(transform(whole, seed), full)  # a decoded image is not drafted
            difference = (as_float(crop) - as_float(full)).abs().mean().item()
            assert difference <= TOLERANCE, (path, seed, difference)
            if train:  # the same crop moved by one output pixel is much further off
                shifted = full_decode_crop(whole, seed, train, shift=1)
                assert difference < (as_float(shifted) - as_float(full)).abs().mean().item() / 4
    assert scales >= ({1, 4, 8} if train else {1, 8})


@pytest.mark.parametrize("train", [True, False])
def test_the_scale_is_the_largest_that_leaves_the_crop_hr_size_px_on_each_side(photos, train):
    _, source = photos
    transform = CropTransform(HR, 4, train=train)
    for path in sorted(source.glob("train/*/*.jpg")):
        raw = path.read_bytes()
        width, height = Image.open(path).size
        for seed in range(30):
            image = open_image(raw, str(path))
            crop = transform.draft(image, seed)
            top, left, box_height, box_width = (value * crop.scale for value in crop.box)  # in stored px
            assert crop.scale == 1 or min(box_height, box_width) / crop.scale >= HR
            assert crop.scale == 8 or min(box_height, box_width) / (2 * crop.scale) < HR
            if train:  # the random draws of a full decode: the same box and flip
                rng = random.Random(seed)
                assert (top, left, box_height, box_width) == pytest.approx(
                    random_resized_crop_box(width, height, rng, (0.35, 1.0)))
                assert crop.flip == (rng.random() < 0.5)
            image.load()
            assert image.size == (-(-width // crop.scale), -(-height // crop.scale))


def test_dct_scale():
    assert [dct_scale(side, 64) for side in (30, 64, 127, 128, 255, 256, 511, 512, 5000)] == [1, 1, 1, 2, 2, 4, 4,
                                                                                              8, 8]


@pytest.mark.parametrize("train", [True, False])
def test_a_png_is_decoded_whole_and_cropped_as_before_bit_for_bit(tmp_path, train):
    source = tmp_path / "src"
    for split in ("train", "val"):
        for label in range(2):
            (source / split / f"class{label}").mkdir(parents=True)
            photo(701, 523, seed=label).save(source / split / f"class{label}" / "0.png")
    prepare_imagefolder(str(source), str(tmp_path / "data"))
    transform = CropTransform(HR, 4, train=train)
    dataset = ShardedImageDataset(str(tmp_path / "data"), "train", transform)
    for index in range(len(dataset)):
        raw, path = dataset.encoded(index)
        for seed in range(10):
            assert transform.draft(open_image(raw, path), seed).scale == 1  # a JPEG this size: 4 or 8
            assert torch.equal(dataset[index, seed][0], full_decode_crop(decode_rgb(raw, path), seed, train))


def test_a_jpeg_too_small_to_draft_is_cropped_as_before_bit_for_bit():
    raw = encoded(photo(120, 100))  # under 2 x HR: no crop has 2 x HR px
    transform = CropTransform(HR, 4, train=True)
    for seed in range(10):
        image = open_image(raw, "small.jpg")
        crop = transform.draft(image, seed)
        assert crop.scale == 1
        assert torch.equal(transform.crop(image, crop), full_decode_crop(decode_rgb(raw, "small.jpg"), seed, True))


def test_a_truncated_jpeg_is_named_when_it_is_decoded(photos, monkeypatch):
    data, _ = photos
    dataset = ShardedImageDataset(data, "train", CropTransform(HR, 4, train=True))
    raw, path = dataset.encoded(0)
    monkeypatch.setattr(dataset, "encoded", lambda index: (raw[:len(raw) // 3], path))
    with pytest.raises(DataError, match=f"corrupt image {path}"):
        dataset[0, 0]

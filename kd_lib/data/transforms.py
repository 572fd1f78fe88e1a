"""The per-sample crop and the on-device pairing: one crop and flip, two resolutions.

A sample is the HR crop (``hr_size``) as uint8 ``(hr_size, hr_size, 3)``;
loaders ship these bytes only. On the training device, :class:`PairedResize`
turns a batch of crops into the normalized HR batch and the same crops
downsampled by ``ratio`` (``hr_size // ratio``), so teacher and student see
the same content (METHODS.md, "The setting"). Downsampling is antialiased
bilinear by default (area, bicubic and nearest on request), done on the
[0, 1] image before normalization, which commutes with these linear
resamplers (:func:`kd_lib.ops.paired_resize`).

Randomness comes from the per-sample ``seed`` only, so a sample's crop does not
depend on the loader's workers or on where a resumed run restarted.

A JPEG is decoded at the smallest size its crop allows: libjpeg scales while
it decodes, in the DCT domain, by 1/2, 1/4 or 1/8 (each 8x8 block of
coefficients becomes a 4x4, 2x2 or 1x1 block of pixels; Pillow's
``Image.draft``), which saves most of the inverse DCT, the colour conversion
and the resize of the crop, though not the entropy decoding of every
coefficient. The crop is drawn on the stored size, read from the header,
with the same random draws as a full decode, so the boxes and flips are the
same (:meth:`CropTransform.draft`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from kd_lib.ops import ResizeMode, paired_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The reductions libjpeg's DCT scaling decodes a JPEG at (1/s of each side), largest first.
DCT_SCALES = (8, 4, 2, 1)


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float], aspect: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) box covering ``scale`` of the image
    area with an aspect ratio in ``aspect`` (log-uniform), as in Inception
    training; the central largest box when ten draws fail."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


@dataclass(frozen=True)
class PairedResize:
    """A uint8 ``(N, H, W, 3)`` batch -> ``(hr, lr)``: float ``(N, 3, H, W)`` and ``(N, 3, H // ratio,
    W // ratio)``, each ``(x / 255 - mean) / std``, ``lr`` downsampled with ``mode`` first.

    Runs on the batch's device (:func:`kd_lib.ops.paired_resize`: one CUDA
    kernel on CUDA). ``mean`` and ``std`` default to ImageNet's; a detector,
    which normalizes inside, takes zeros and ones (images in [0, 1]).
    """

    ratio: int
    mode: ResizeMode = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels_last: bool = False  #: both batches in the channels-last memory format

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return paired_resize(images, self.ratio, self.mode, self.mean, self.std, channels_last=self.channels_last)


def dct_scale(side: float, size: int) -> int:
    """The largest ``s`` of :data:`DCT_SCALES` with ``side / s >= size``: the reduction at which a crop whose
    shorter side is ``side`` px still has ``size`` px or more across (1 when even the whole image has fewer)."""
    return next((s for s in DCT_SCALES if side >= s * size), 1)


def centre_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The (top, left, height, width) box, in px of a ``width`` x ``height`` image, that torchvision keeps when
    it resizes the shorter side to ``size`` and takes the central ``size`` square (its rounding included)."""
    short, long = sorted((width, height))
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    x, y = width / new_width, height / new_height
    return round((new_height - size) / 2) * y, round((new_width - size) / 2) * x, size * y, size * x


@dataclass(frozen=True)
class Crop:
    """A sample's crop: its (top, left, height, width) ``box`` in px of the image as it will be decoded, whether
    it is flipped, and the DCT ``scale`` the image was drafted to (1: decoded whole, ``box`` in whole px)."""

    box: tuple[float, float, float, float]
    flip: bool
    scale: int


class CropTransform:
    """PIL RGB image and seed -> the HR crop, uint8 ``(hr_size, hr_size, 3)``.

    Training: random resized crop (area fraction ``crop_scale``..1) and a
    horizontal flip with probability 1/2. Evaluation: resize the shorter side
    to ``hr_size`` and take the central square. ``pairing`` makes the
    normalized HR and LR batches of a batch of crops, on the training device.
    A JPEG opened but not yet decoded (:func:`kd_lib.data.imagefolder.open_image`)
    is decoded at the crop's DCT scale (:meth:`draft`).
    """

    def __init__(self, hr_size: int, ratio: int, train: bool, resize: ResizeMode = "bilinear",
                 crop_scale: float = 0.35):
        if hr_size % ratio:
            raise ValueError(f"hr_size {hr_size} is not divisible by ratio {ratio}")
        self.hr_size, self.train, self.crop_scale = hr_size, train, crop_scale
        self.pairing = PairedResize(ratio, resize)

    def __call__(self, image: Image.Image, seed: int = 0) -> torch.Tensor:
        """The crop of ``image`` for ``seed``, uint8 ``(hr_size, hr_size, 3)``."""
        return self.crop(image, self.draft(image, seed))

    def draft(self, image: Image.Image, seed: int = 0) -> Crop:
        """Draw the crop of ``image`` for ``seed`` on its stored size (a lazily opened image's header has it)
        and have a JPEG not yet decoded decode at the largest reduction that leaves the crop's box at least
        ``hr_size`` px on each side (:func:`dct_scale`; libjpeg's DCT scaling, through Pillow's
        ``Image.draft``). Any other image, or one already decoded, stays as it is (scale 1).

        The random draws are a full decode's, in its order (the box, then the flip), so the boxes and flips, and
        their distribution, do not change. The box is then mapped into the drafted image by the scale Pillow
        reports: libjpeg makes each 8x8 block s times smaller, so a pixel of the stored image at x lies at x / s
        (the drafted size, rounded up to whole pixels, is not the factor: it would move the box by up to a
        drafted pixel)."""
        width, height = image.size
        if self.train:
            rng = random.Random(seed)
            box: tuple[float, ...] = random_resized_crop_box(width, height, rng, (self.crop_scale, 1.0))
            flip = rng.random() < 0.5
        else:
            box, flip = centre_box(width, height, self.hr_size), False
        scale = dct_scale(min(box[2], box[3]), self.hr_size)
        drafted = image.draft("RGB", (width // scale, height // scale)) if scale > 1 else None
        if drafted is None:
            return Crop(box, flip, 1)
        _, (_, _, extent_x, extent_y) = drafted  # where the stored image's far corner lies in the drafted one
        x, y = extent_x / width, extent_y / height
        top, left, box_height, box_width = box
        return Crop((top * y, left * x, box_height * y, box_width * x), flip, round(width / extent_x))

    def crop(self, image: Image.Image, crop: Crop) -> torch.Tensor:
        """``crop`` of the RGB ``image`` (as :meth:`draft` left it, now decoded), resized to ``hr_size``
        (antialiased bilinear), uint8 ``(hr_size, hr_size, 3)``. Decoded whole, the box is in whole pixels
        and the crop is torchvision's, as it was before drafting existed; drafted, the box has fractional
        pixels, which Pillow's resize takes as they are."""
        size = [self.hr_size, self.hr_size]
        if crop.scale > 1:
            top, left, height, width = crop.box
            image = image.resize(tuple(size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height))
        elif self.train:
            image = TF.resized_crop(image, *crop.box, size=size, antialias=True)
        else:
            image = TF.center_crop(TF.resize(image, self.hr_size, antialias=True), size)
        if crop.flip:
            image = TF.horizontal_flip(image)
        return torch.from_numpy(np.array(image))

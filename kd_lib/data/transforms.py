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


class CropTransform:
    """PIL RGB image and seed -> the HR crop, uint8 ``(hr_size, hr_size, 3)``.

    Training: random resized crop (area fraction ``crop_scale``..1) and a
    horizontal flip with probability 1/2. Evaluation: resize the shorter side
    to ``hr_size`` and take the central square. ``pairing`` makes the
    normalized HR and LR batches of a batch of crops, on the training device.
    """

    def __init__(self, hr_size: int, ratio: int, train: bool, resize: ResizeMode = "bilinear",
                 crop_scale: float = 0.35):
        if hr_size % ratio:
            raise ValueError(f"hr_size {hr_size} is not divisible by ratio {ratio}")
        self.hr_size, self.train, self.crop_scale = hr_size, train, crop_scale
        self.pairing = PairedResize(ratio, resize)

    def __call__(self, image: Image.Image, seed: int = 0) -> torch.Tensor:
        """The crop of ``image`` for ``seed``, uint8 ``(hr_size, hr_size, 3)``."""
        size = [self.hr_size, self.hr_size]
        if self.train:
            rng = random.Random(seed)
            box = random_resized_crop_box(image.width, image.height, rng, (self.crop_scale, 1.0))
            image = TF.resized_crop(image, *box, size=size, antialias=True)
            if rng.random() < 0.5:
                image = TF.horizontal_flip(image)
        else:
            image = TF.center_crop(TF.resize(image, self.hr_size, antialias=True), size)
        return torch.from_numpy(np.array(image))

"""The paired HR/LR transform: one crop and flip, two resolutions.

Every sample gives the HR crop (``hr_size``) and the same crop downsampled by
``ratio`` (``hr_size // ratio``), so teacher and student see the same content
(METHODS.md, "The setting"). Downsampling is antialiased bilinear by default
(area, bicubic and nearest on request); it is done on the [0, 1] image before
normalization, which commutes with these linear resamplers.

Randomness comes from the per-sample ``seed`` only, so a sample's crop does not
depend on the loader's workers or on where a resumed run restarted.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ResizeMode = Literal["bilinear", "area", "bicubic", "nearest"]


def downsample(images: torch.Tensor, ratio: int, mode: ResizeMode = "bilinear") -> torch.Tensor:
    """``images`` (N, C, H, W) resized to (H // ratio, W // ratio) with ``mode``.

    Bilinear and bicubic are antialiased (a low-pass filter as wide as the
    ratio, as in PIL), area averages ``ratio x ratio`` blocks, nearest picks
    one pixel per block.
    """
    size = (images.shape[-2] // ratio, images.shape[-1] // ratio)
    if mode == "area":
        return F.adaptive_avg_pool2d(images, size)
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=size, mode=mode, antialias=antialias,
                         **({} if mode == "nearest" else {"align_corners": False}))


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


class PairedTransform:
    """PIL RGB image and seed -> (normalized HR tensor, normalized LR tensor).

    Training: random resized crop (area fraction ``crop_scale``..1) and a
    horizontal flip with probability 1/2. Evaluation: resize the shorter side
    to ``hr_size`` and take the central square.
    """

    def __init__(self, hr_size: int, ratio: int, train: bool, resize: ResizeMode = "bilinear",
                 crop_scale: float = 0.35):
        if hr_size % ratio:
            raise ValueError(f"hr_size {hr_size} is not divisible by ratio {ratio}")
        self.hr_size, self.ratio, self.train = hr_size, ratio, train
        self.resize, self.crop_scale = resize, crop_scale
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def hr_image(self, image: Image.Image, seed: int) -> torch.Tensor:
        """The HR crop as a float (3, hr_size, hr_size) tensor in [0, 1]."""
        size = [self.hr_size, self.hr_size]
        if self.train:
            rng = random.Random(seed)
            box = random_resized_crop_box(image.width, image.height, rng, (self.crop_scale, 1.0))
            image = TF.resized_crop(image, *box, size=size, antialias=True)
            if rng.random() < 0.5:
                image = TF.horizontal_flip(image)
        else:
            image = TF.center_crop(TF.resize(image, self.hr_size, antialias=True), size)
        return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)

    def __call__(self, image: Image.Image, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.hr_image(image, seed)
        lr = downsample(hr[None], self.ratio, self.resize)[0]
        return (hr - self.mean) / self.std, (lr - self.mean) / self.std

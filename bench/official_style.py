"""What the data benchmarks share: generated ImageFolders, and the official code's data path to compare against.

``write_images`` makes a folder of smooth-noise images over ``CLASSES``
classes; ``PairedFolder`` is Pixel Distillation's official data path:
torchvision ``ImageFolder`` with ``RandomResizedCrop``, ``ToTensor`` and
``Normalize``, the HR tensor and its LR resize both made in the loader's
workers (the project ships uint8 crops and pairs them on the device).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from kd_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CLASSES = 10
#: The crops' smallest area share, the training stages' default ``crop_scale``, so both paths crop alike.
CROP_SCALE = 0.35


def write_images(root: Path, count: int, side: int, suffix: str = ".png", grain: float = 0.0) -> Path:
    """``count`` train images (and ``CLASSES`` val) of smooth noise, ``side`` px, in ``CLASSES`` class
    folders, as ``suffix`` files; a folder made before (its ``complete`` marker) is kept as it is.
    ``grain`` > 0 adds per-pixel Gaussian noise of that standard deviation, so that a JPEG costs about what
    a photo of its size costs to store and decode."""
    if (root / "complete").exists():
        return root
    rng = np.random.default_rng(count)
    for split, n in (("train", count), ("val", CLASSES)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR)
            if grain:
                image = Image.fromarray(np.clip(np.asarray(image) + rng.normal(0, grain, (side, side, 3)),
                                                0, 255).astype(np.uint8))
            image.save(root / split / f"class{i % CLASSES}" / f"{i:07d}{suffix}")
    (root / "complete").touch()
    return root


class PairedFolder(torchvision.datasets.ImageFolder):
    """The official data path: the normalized HR crop and its LR resize, made in the workers."""

    def __init__(self, root: str, hr_size: int, ratio: int):
        super().__init__(root, T.Compose([T.RandomResizedCrop(hr_size, scale=(CROP_SCALE, 1.0)),
                                          T.RandomHorizontalFlip(), T.ToTensor(),
                                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
        self.lr_size = hr_size // ratio

    def __getitem__(self, index):
        hr, label = super().__getitem__(index)
        return hr, TF.resize(hr, [self.lr_size, self.lr_size], antialias=True), label

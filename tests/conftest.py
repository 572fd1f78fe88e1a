"""Shared fixtures: small ImageFolders written as real image files, and their prepared shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def write_imagefolder(root: Path, classes: int = 3, train: int = 12, val: int = 4, size: int = 32,
                      seed: int = 0) -> Path:
    """Class ``c`` images: noise around a class-specific grey level, so classes are learnable."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(40 + 80 * c, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def make_imagefolder():
    return write_imagefolder


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "src")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> str:
    """A prepared 3-class dataset (24 x 3 train, 6 x 3 val images, 32 px)."""
    from kd_lib.data.shards import prepare_imagefolder

    root = tmp_path_factory.mktemp("prepared")
    source = write_imagefolder(root / "src", train=24, val=6)
    prepare_imagefolder(str(source), str(root / "data"))
    return str(root / "data")

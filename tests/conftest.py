"""Shared fixtures: small ImageFolders written as real image files, and their prepared shards; and
the ``requires`` marker, which skips a test whose requirement is missing, or fails it under CI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

#: CPU threads of each test process: the cores shared among pytest-xdist's workers. More threads
#: than cores make OpenMP spin against itself, many times slower; the subprocesses that tests start
#: (stages, kfp.local tasks, torchrun) inherit the same share through OMP_NUM_THREADS.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


def require(ok: bool, missing: str) -> None:
    """Skip the running test when ``ok`` is false (``missing`` says what is missing: nvcc, the GCS
    emulator, the shared data), except where the environment variable ``CI`` is set: there it
    fails, so that CI cannot pass by skipping what the README promises it tests. (GPU tests are
    not among these: they skip without a GPU, CI included.)"""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing}; CI is set, so this test must run", pytrace=False)
    pytest.skip(missing)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "requires(ok, missing): skip when ok is false, fail when env CI is set")


def pytest_collection_modifyitems(items) -> None:
    """The end-to-end tests (marked ``slow``) first: pytest-xdist hands them out in turn, so that
    each worker starts on long ones and the short tests fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("requires"):
        require(*mark.args)


@pytest.fixture(scope="session", name="require")
def require_fixture():
    """:func:`require`, for fixtures that find out what is missing as they run."""
    return require


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


@pytest.fixture(scope="session")
def bench_module():
    """``bench_module(NAME)``: the module of ``bench/NAME.py`` (the benchmarks are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench"
                                                      / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


def write_coco(root: Path, images: int = 16, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A COCO dataset of noise images with one or two filled rectangles each, class 1 red and
    class 2 blue; returns the annotation file and the image folder."""
    import json

    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records, annotations = [], []
    for index in range(images):
        pixels = rng.integers(60, 140, (size, size, 3)).astype(np.uint8)
        for _ in range(rng.integers(1, 3)):
            category = int(rng.integers(1, 3))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y:y + h, x:x + w] = (220, 30, 30) if category == 1 else (30, 30, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        records.append({"id": index + 1, "file_name": f"{index:03d}.png", "width": size, "height": size})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}))
    return path, folder


@pytest.fixture(scope="session")
def prepared_detection(tmp_path_factory) -> str:
    """A prepared 2-class detection dataset at 128 px (about 18 train, 6 val images)."""
    from kd_lib.config import from_dict
    from components import prepare_data

    root = tmp_path_factory.mktemp("detection")
    annotations, images = write_coco(root / "src", images=24, size=128)
    prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
        "source": str(annotations), "images": str(images), "out": str(root / "data"), "image_size": 128,
        "val_fraction": 0.25}))
    return str(root / "data")

"""A generated detection dataset where resolution matters, for the CPU detection demo.

Each image shows one to ``max_objects`` objects on the classification demo's
clutter (:mod:`kd_lib.data.demo`: smooth background, distractor strokes,
lighting, sensor noise). An object is one of the demo's shapes (disc,
square, triangle, cross) at a random pose and size, a radius of
``RADIUS_RANGE`` times the image side, so that the objects span COCO's
small and medium scales at the LR side. Objects do not overlap.

The classes are the demo's (colour family, surface) pairs: ``red_plain``,
``red_striped``, ``yellow_plain``, ... Colour survives any downsampling, so
an LR detector finds the objects and their colour. The stripes (period
``PERIOD_RANGE``, 3-5 HR pixels) straddle the LR Nyquist limit at ``K = 2``
(a period of ``2K`` = 4 HR pixels): downsampled with an antialiased
bilinear filter a 5-pixel grating keeps about half its contrast, a 4-pixel
one two fifths and a 3-pixel one a sixth, aliased. So at LR the surface is
degraded, not gone: plain against striped of one colour is where an LR
detector fails and an HR teacher does not.

A box is the extent of the object's pixels of coverage at least one half,
so the labels are exact. The dataset is a YOLO root (``images/{train,val}``,
``labels/{train,val}``, ``data.yaml``) that prepare-data reads as it is, and
``detection_demo.json`` written last. Each image is drawn from its own
generator seeded from ``(seed, split, index)``.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
from tqdm import tqdm

from kd_lib.data.demo import (SHAPES, _background, _lighting, _strokes, demo_classes, encode_png,
                              existing_dataset, paint_object)
from kd_lib.io.fs import filesystem, join, write_text

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "detection_demo.json"
RADIUS_RANGE = (0.07, 0.2)  # object radius as a fraction of the side: 18 to 51 px objects at 128 px
PERIOD_RANGE = (3.0, 5.0)  # stripe period in HR pixels, around 2K = 4 for K = 2
GAP = 2.0  # pixels between two objects' circumscribing circles

Array = np.ndarray
Box = tuple[int, int, int, int]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, independent of every other image's."""
    return np.random.default_rng([FORMAT_VERSION, seed, SPLITS.index(split), index])


def _separated_luminance(rng: np.random.Generator, background: float) -> float:
    """An object's grey level, 0.18-0.32 above or below the background's, within [0.15, 0.85]."""
    separation = rng.uniform(0.18, 0.32) * rng.choice([-1.0, 1.0])
    if not 0.15 <= background + separation <= 0.85:
        separation = -separation
    return background + separation


def _placements(rng: np.random.Generator, size: int, count: int) -> list[tuple[Array, float]]:
    """Up to ``count`` (centre, radius) pairs inside the image whose circumscribing circles (1.4
    radii, the cross's reach) are ``GAP`` apart; a draw that does not fit is skipped."""
    placed: list[tuple[Array, float]] = []
    for _ in range(count):
        radius = rng.uniform(*RADIUS_RANGE) * size
        reach = 1.4 * radius
        centre = rng.uniform(reach, size - reach, 2)
        if all(np.hypot(*(centre - c)) >= reach + 1.4 * r + GAP for c, r in placed):
            placed.append((centre, radius))
    return placed


def _box(alpha: Array) -> Box | None:
    """The pixel extent ``(x1, y1, x2, y2)`` of coverage >= 0.5 (x2, y2 exclusive); None when empty."""
    rows, cols = np.flatnonzero((alpha >= 0.5).any(axis=1)), np.flatnonzero((alpha >= 0.5).any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render_scene(rng: np.random.Generator, num_classes: int, size: int, max_objects: int
                 ) -> tuple[Array, list[tuple[int, Box]]]:
    """One RGB ``uint8`` image (size, size, 3) and its objects as (label, box)."""
    classes = demo_classes(num_classes)
    background = rng.uniform(0.3, 0.7)
    image = _strokes(rng, _background(rng, size, background))
    objects = []
    for centre, radius in _placements(rng, size, int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(num_classes))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        image, alpha = paint_object(rng, image, classes[label], _separated_luminance(rng, background), shape,
                                    centre, radius, PERIOD_RANGE)
        box = _box(alpha)
        if box is not None:
            objects.append((label, box))
    image = _lighting(rng, image) + rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), objects


def yolo_line(label: int, box: Box, size: int) -> str:
    """``class cx cy w h``, normalized by the image side."""
    x1, y1, x2, y2 = box
    return f"{label} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"


def generate_detection_demo(root: str, *, seed: int = 0, num_classes: int = 4, train_images: int = 400,
                            val_images: int = 100, size: int = 128, max_objects: int = 4) -> dict:
    """Write the detection demo as a YOLO root under ``root`` (any fsspec URI) and return its
    ``detection_demo.json``.

    A root that already holds a complete dataset with the same parameters is
    returned as it is; one with other parameters is an error naming them.
    """
    parameters = {"format": FORMAT_VERSION, "seed": seed, "num_classes": num_classes, "train_images": train_images,
                  "val_images": val_images, "size": size, "max_objects": max_objects}
    manifest_uri = join(root, MANIFEST)
    existing = existing_dataset(manifest_uri, parameters)
    if existing:
        return existing
    names = [c.name for c in demo_classes(num_classes)]
    counts = {"train": train_images, "val": val_images}
    fs, path = filesystem(root)
    for split in SPLITS:
        for folder in ("images", "labels"):
            fs.makedirs(posixpath.join(path, folder, split), exist_ok=True)
    objects = {split: 0 for split in SPLITS}
    jobs = [(split, index) for split in SPLITS for index in range(counts[split])]
    for split, index in tqdm(jobs, desc="detection demo data", unit="img"):
        pixels, found = render_scene(image_rng(seed, split, index), num_classes, size, max_objects)
        with fs.open(posixpath.join(path, "images", split, f"{index:05d}.png"), "wb") as f:
            f.write(encode_png(pixels))
        lines = "".join(yolo_line(label, box, size) + "\n" for label, box in found)
        write_text(join(root, "labels", split, f"{index:05d}.txt"), lines)
        objects[split] += len(found)
    write_text(join(root, "data.yaml"), "names:\n" + "".join(f"  {i}: {name}\n" for i, name in enumerate(names)))
    manifest = {"parameters": parameters, "classes": names, "images": counts, "objects": objects}
    write_text(manifest_uri, json.dumps(manifest, indent=2))
    return manifest

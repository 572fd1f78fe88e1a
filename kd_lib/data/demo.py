"""A generated ImageFolder where resolution matters, for the CPU demo.

Every class is a pair (colour family, surface):

* Coarse part, the object's colour family: red, yellow, green or blue (hue
  jittered by +-12 degrees, random saturation and brightness). Colour is
  carried by the low frequencies, so it survives any downsampling: a
  low-resolution (LR) model can still tell the families apart.
* Fine part, the object's surface: ``plain`` or ``striped`` (a sinusoidal
  grating of period 5-9 HR pixels, random orientation and phase, zero mean,
  contrast 0.25-0.4). The grating averages out to the plain surface.

What the stripes become at LR: downsampling by ``K`` with an antialiased
bilinear filter (a tent ``2K`` HR pixels wide, as
``F.interpolate(x, scale_factor=1/K, mode="bilinear", antialias=True)``)
keeps a fraction ``sinc^2(K / period)`` of a grating's amplitude and cannot
represent periods under ``2K`` HR pixels (the LR Nyquist limit). For ``K = 4``
a 9-pixel grating keeps about half its contrast, an 8-pixel one two fifths, a
5-pixel one a few per cent, below the sensor noise. So at LR the cue is
degraded, not gone: the coarser gratings survive faintly, the finer ones
vanish, and an LR model learns the surface poorly from the labels alone,
while a high-resolution (HR) model sees every grating clearly. Colour alone
gives half the classes (50 % top-1 with 8 classes).

Nuisance variation, drawn independently of the class: a smooth cluttered
background (greyish low-frequency field plus soft blobs), thin distractor
strokes, the object's shape (disc, square, triangle or cross), position,
size, rotation, aspect, edge softness and shading, the stripes' period,
orientation and phase, the global lighting (brightness and gradient) and
Gaussian sensor noise.

Each image is drawn from its own ``numpy.random.Generator`` seeded from
``(seed, split, class, index)``, so the dataset is reproducible bit for bit
and does not depend on the order of generation.
"""

from __future__ import annotations

import colorsys
import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from kd_lib.io.fs import exists, filesystem, join, read_text, write_text

FORMAT_VERSION = 3
SPLITS = ("train", "val")
SHAPES = ("disc", "square", "triangle", "cross")
HUES = {"red": 0.0, "yellow": 1 / 6, "green": 1 / 3, "blue": 2 / 3}
SURFACES = ("plain", "striped")
PERIOD_RANGE = (5.0, 9.0)  # stripe period in HR pixels, around 2K = 8 for K = 4
CONTRAST_RANGE = (0.25, 0.4)  # stripe amplitude (of the unit-variance grating) on the [0, 1] scale
MANIFEST = "demo.json"

Array = np.ndarray


@dataclass(frozen=True)
class DemoClass:
    """One class: its folder name, colour family and surface."""

    name: str
    hue: str
    surface: str


def demo_classes(num_classes: int) -> list[DemoClass]:
    """The first ``num_classes`` classes, in label order (colour-major, so
    classes 2k and 2k + 1 share a colour and differ only in surface)."""
    limit = len(HUES) * len(SURFACES)
    if not 2 <= num_classes <= limit:
        raise ValueError(f"num_classes must be between 2 and {limit}, got {num_classes}")
    pairs = [(hue, surface) for hue in HUES for surface in SURFACES][:num_classes]
    return [DemoClass(f"{i:02d}_{hue}_{surface}", hue, surface) for i, (hue, surface) in enumerate(pairs)]


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one image, independent of every other image's."""
    return np.random.default_rng([FORMAT_VERSION, seed, SPLITS.index(split), label, index])


# ---------------------------------------------------------------- rendering


def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x), each of shape (size, size)."""
    axis = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(axis, axis, indexing="ij")


def _coverage(signed_distance: Array, softness: float) -> Array:
    """Alpha in [0, 1] from a signed distance (negative inside), with an edge
    ``softness`` pixels wide."""
    return np.clip(0.5 - signed_distance / softness, 0.0, 1.0)


def _blend(image: Array, colour: Array, alpha: Array) -> Array:
    return image * (1.0 - alpha[..., None]) + colour * alpha[..., None]


def _random_colour(rng: np.random.Generator, luminance: float) -> Array:
    """An RGB colour of about the given grey level with a random tint."""
    tint = rng.normal(0.0, 0.12, 3)
    return np.clip(luminance + tint - tint.mean(), 0.02, 0.98)


def _smooth_field(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> Array:
    """A smooth random RGB field: Gaussian-interpolated noise on a coarse grid."""
    centres = (np.arange(cells) + 0.5) * size / cells
    pixels = np.arange(size) + 0.5
    weights = np.exp(-0.5 * ((pixels[:, None] - centres[None, :]) / (size / cells)) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    coarse = rng.normal(0.0, amplitude, (cells, cells, 3))
    return np.einsum("ia,abc,jb->ijc", weights, coarse, weights)


def _background(rng: np.random.Generator, size: int, luminance: float) -> Array:
    """Smooth cluttered background: tinted base, low-frequency field, soft blobs."""
    yy, xx = _grid(size)
    image = _random_colour(rng, luminance) + _smooth_field(rng, size, int(rng.integers(2, 5)), 0.12)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(0.1, 0.3) * size
        distance = np.hypot(yy - cy, xx - cx) - radius
        alpha = _coverage(distance, rng.uniform(0.15, 0.4) * size) * rng.uniform(0.3, 0.7)
        image = _blend(image, _random_colour(rng, luminance + rng.normal(0, 0.08)), alpha)
    return image


def _strokes(rng: np.random.Generator, image: Array) -> Array:
    """Thin straight distractor strokes (no periodic structure)."""
    size = image.shape[0]
    yy, xx = _grid(size)
    for _ in range(int(rng.integers(0, 4))):
        start, end = rng.uniform(0, size, (2, 2))
        direction = end - start
        t = ((yy - start[0]) * direction[0] + (xx - start[1]) * direction[1]) / (direction @ direction)
        t = np.clip(t, 0.0, 1.0)
        distance = np.hypot(yy - start[0] - t * direction[0], xx - start[1] - t * direction[1])
        alpha = _coverage(distance - rng.uniform(0.4, 1.2), 1.0) * rng.uniform(0.4, 0.9)
        image = _blend(image, _random_colour(rng, rng.uniform(0.15, 0.85)), alpha)
    return image


def _box_distance(u: Array, v: Array, half_u: float, half_v: float) -> Array:
    """Signed distance to an axis-aligned box centred at the origin."""
    du, dv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.hypot(np.maximum(du, 0.0), np.maximum(dv, 0.0))
    return outside + np.minimum(np.maximum(du, dv), 0.0)


def _triangle_distance(u: Array, v: Array, radius: float) -> Array:
    """Signed distance (exact inside, a lower bound outside) to an equilateral
    triangle inscribed in a circle of ``radius``, pointing along -v."""
    normals = [(np.sin(a), -np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
    return np.max([nu * u + nv * v for nu, nv in normals], axis=0) - radius / 2


def _shape_distance(shape: str, u: Array, v: Array, radius: float) -> Array:
    """Signed distance to a shape family member of about equal area."""
    if shape == "disc":
        return np.hypot(u, v) - radius
    if shape == "square":
        return _box_distance(u, v, 0.89 * radius, 0.89 * radius)
    if shape == "triangle":
        return _triangle_distance(u, v, 1.35 * radius)
    if shape == "cross":
        arm = 0.38 * radius
        return np.minimum(_box_distance(u, v, 1.15 * radius, arm),
                          _box_distance(u, v, arm, 1.15 * radius))
    raise ValueError(f"unknown shape {shape!r}")


def _stripes(rng: np.random.Generator, yy: Array, xx: Array, period_range: tuple[float, float]) -> Array:
    """A zero-mean, unit-variance sinusoidal grating with a random period in
    ``period_range`` (HR pixels), orientation and phase."""
    frequency = 2 * np.pi / rng.uniform(*period_range)
    angle = rng.uniform(0, np.pi)
    return np.sqrt(2.0) * np.cos(frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))


def _object_colour(rng: np.random.Generator, hue: str, luminance: float) -> Array:
    """An RGB colour of the ``hue`` family, about as bright as ``luminance``."""
    h = (HUES[hue] + rng.uniform(-1 / 30, 1 / 30)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.45, 0.8), 1.0))
    return np.clip(rgb * luminance / rgb.mean(), 0.02, 0.98)


def paint_object(rng: np.random.Generator, image: Array, cls: DemoClass, luminance: float, shape: str,
                 centre: Array, radius: float, period_range: tuple[float, float] = PERIOD_RANGE
                 ) -> tuple[Array, Array]:
    """``image`` with an object of class ``cls`` (its colour family, plain or striped) painted at
    ``centre`` (y, x) with about ``radius`` pixels, at a random rotation, aspect, edge softness and
    shading; and the object's coverage (alpha in [0, 1]).

    The random draws are the same for both surfaces, so the same generator
    renders the same scene with or without stripes."""
    yy, xx = _grid(image.shape[0])
    (cy, cx), rotation = centre, rng.uniform(0, 2 * np.pi)
    stretch = np.exp(rng.uniform(-0.12, 0.12))
    u = ((xx - cx) * np.cos(rotation) + (yy - cy) * np.sin(rotation)) / stretch
    v = (-(xx - cx) * np.sin(rotation) + (yy - cy) * np.cos(rotation)) * stretch
    alpha = _coverage(_shape_distance(shape, u, v, radius), rng.uniform(0.8, 1.8))
    slope = rng.normal(0.0, 0.1, 2)
    shading = (slope[0] * u + slope[1] * v) / radius
    stripes = rng.uniform(*CONTRAST_RANGE) * _stripes(rng, yy, xx, period_range) * (cls.surface == "striped")
    colour = _object_colour(rng, cls.hue, luminance)
    return _blend(image, colour + (shading + stripes)[..., None], alpha), alpha


def _draw_object(rng: np.random.Generator, image: Array, cls: DemoClass, luminance: float) -> Array:
    """The object of a classification image: a random shape near the centre, a fifth to a third of the side."""
    size = image.shape[0]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    centre = rng.uniform(0.32, 0.68, 2) * size
    radius = rng.uniform(0.2, 0.3) * size
    return paint_object(rng, image, cls, luminance, shape, centre, radius)[0]


def _lighting(rng: np.random.Generator, image: Array) -> Array:
    """Global brightness and a linear illumination gradient."""
    size = image.shape[0]
    yy, xx = _grid(size)
    gradient = rng.normal(0.0, 0.12, 2)
    gain = rng.uniform(0.85, 1.1) * (1 + (gradient[0] * (yy / size - 0.5) + gradient[1] * (xx / size - 0.5)))
    return image * gain[..., None]


def render_image(rng: np.random.Generator, cls: DemoClass, size: int) -> Array:
    """One RGB ``uint8`` image (size, size, 3) of class ``cls``."""
    object_luminance = rng.uniform(0.3, 0.7)
    separation = rng.uniform(0.18, 0.32) * rng.choice([-1.0, 1.0])
    if not 0.15 <= object_luminance + separation <= 0.85:
        separation = -separation
    image = _strokes(rng, _background(rng, size, object_luminance + separation))
    image = _lighting(rng, _draw_object(rng, image, cls, object_luminance))
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def encode_png(pixels: Array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- writing


def demo_parameters(seed: int, num_classes: int, train_per_class: int, val_per_class: int,
                    size: int) -> dict:
    return {"format": FORMAT_VERSION, "seed": seed, "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size}


def existing_dataset(manifest_uri: str, parameters: dict) -> dict | None:
    """The manifest of a complete generated dataset with these ``parameters`` at ``manifest_uri``,
    None when there is none.

    Raises:
        ValueError: the dataset there was generated with other parameters (the message names them).
    """
    if not exists(manifest_uri):
        return None
    existing = json.loads(read_text(manifest_uri))
    found = existing.get("parameters", {})
    differ = [f"{k}={found.get(k)!r} (asked {v!r})" for k, v in parameters.items() if found.get(k) != v]
    if differ:
        raise ValueError(f"{posixpath.dirname(manifest_uri)} holds a generated dataset with other parameters: "
                         f"{', '.join(differ)}; choose another folder or remove it")
    return existing


def generate_demo_dataset(root: str, *, seed: int = 0, num_classes: int = 8, train_per_class: int = 150,
                          val_per_class: int = 30, size: int = 64) -> dict:
    """Write the demo ImageFolder under ``root`` (any fsspec URI) and return its ``demo.json``.

    Layout: ``root/{train,val}/<class>/<index:05d>.png``; ``demo.json`` is
    written last. A root that already holds a complete dataset with the same
    parameters is returned as it is; one with other parameters is an error
    naming them.
    """
    parameters = demo_parameters(seed, num_classes, train_per_class, val_per_class, size)
    manifest_uri = join(root, MANIFEST)
    existing = existing_dataset(manifest_uri, parameters)
    if existing:
        return existing
    classes = demo_classes(num_classes)
    counts = {"train": train_per_class, "val": val_per_class}
    jobs = [(split, label, index) for split in SPLITS for label in range(num_classes)
            for index in range(counts[split])]
    fs, path = filesystem(root)
    for split in SPLITS:
        for cls in classes:
            fs.makedirs(posixpath.join(path, split, cls.name), exist_ok=True)
    for split, label, index in tqdm(jobs, desc="demo data", unit="img"):
        pixels = render_image(image_rng(seed, split, label, index), classes[label], size)
        with fs.open(posixpath.join(path, split, classes[label].name, f"{index:05d}.png"), "wb") as f:
            f.write(encode_png(pixels))
    manifest = {"parameters": parameters, "classes": [c.name for c in classes],
                "images": {split: counts[split] * num_classes for split in SPLITS}}
    write_text(manifest_uri, json.dumps(manifest, indent=2))
    return manifest

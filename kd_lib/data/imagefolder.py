"""ImageFolder datasets on any fsspec URI: ``ROOT/{train,val}/<class>/<image>``.

Class names are the sorted folder names of ``train/``; ``val/`` must have the
same classes. Images are decoded with Pillow and converted to RGB (grayscale,
palette, CMYK and alpha images included).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from kd_lib.errors import DataError
from kd_lib.io.fs import inside_root, join, list_files, list_folders

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
#: The JPEG quality of an image prepare-data resizes (:func:`bounded`): FFCV's default for the JPEGs it
#: stores. It is a second lossy encoding on top of the source's, so it is kept high: on a photo resized to
#: 256 px (matplotlib's grace_hopper.jpg), 90 has half the squared error of Pillow's default 75 (35.4 against
#: 32.2 dB PSNR) for 1.7x the bytes.
BOUNDED_QUALITY = 90


@dataclass(frozen=True)
class ImageRecord:
    split: str
    path: str  # relative to the dataset root, e.g. "train/cat/001.jpg"
    label: int


@contextlib.contextmanager
def pillow_errors(name: str) -> Iterator[None]:
    """Pillow's errors on reading ``name`` as :class:`DataError`: a corrupt image, or one larger than Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb, refused at its header)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: refused, a possible decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt image {name}: {err}") from None


def open_image(data: bytes, name: str) -> Image.Image:
    """Image bytes opened lazily: Pillow has read the header (format, size, mode) and decodes nothing until
    :func:`load_rgb`, so a JPEG can still be drafted to a smaller scale
    (:meth:`kd_lib.data.transforms.CropTransform.draft`). :class:`DataError` naming ``name`` as
    :func:`pillow_errors`."""
    with pillow_errors(name):
        return Image.open(io.BytesIO(data))


def load_rgb(image: Image.Image, name: str) -> Image.Image:
    """Decode ``image`` (from :func:`open_image`) and convert it to RGB; :class:`DataError` naming ``name`` if
    it is corrupt."""
    with pillow_errors(name):
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Decode image bytes, whole, to an RGB Pillow image; :class:`DataError` naming ``name`` if corrupt or
    a decompression bomb (:func:`pillow_errors`)."""
    return load_rgb(open_image(data, name), name)


def side_bucket(width: int, height: int) -> str:
    """The power of two at or below the shorter side: images are counted by it in the manifest's
    ``short_sides``, so that a stage can tell how many are far smaller than the size it trains at."""
    return str(1 << (max(1, min(width, height)).bit_length() - 1))


def bounded(image: Image.Image, max_side: int) -> tuple[Image.Image, bytes]:
    """``image`` resized so that its shorter side is ``max_side`` px, with Pillow's antialiased Lanczos filter
    (its sharpest; paid once, at preparation), and its bytes as a JPEG of quality :data:`BOUNDED_QUALITY`.

    Bounded resolution as FFCV stores ImageNet (its ``max_resolution``, at JPEG quality 90), but on the
    shorter side, where FFCV bounds the longer: a training crop (a share of the area, of aspect near 1) and
    the evaluation crop (the shorter side resized to ``hr_size``) both take their pixels across the
    shorter side, so every image keeps ``max_side`` px there whatever its aspect, and a stage can check
    ``hr_size`` against the bound alone; bounding the longer side would leave a wide image's shorter side
    under ``hr_size``."""
    width, height = image.size
    long = round(max(width, height) * max_side / min(width, height))
    resized = image.resize((max_side, long) if width <= height else (long, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, "JPEG", quality=BOUNDED_QUALITY)
    return resized, buffer.getvalue()


def image_row(record: ImageRecord, data: bytes, uri: str, max_side: int = 0) -> dict:
    """The shard row of ``record``, whose bytes ``data`` were read from ``uri``: the bytes as stored, or, when
    ``max_side`` > 0 and the image's shorter side is longer, those of the image :func:`bounded` to it; the
    label and the path, plus the stored bytes' ``sha256`` and the stored image's ``side``
    (:func:`side_bucket`), after checking that ``data`` decode (:class:`DataError` naming ``uri`` if not).
    The per-image work of :func:`kd_lib.data.shards.prepare_imagefolder`, run in its worker processes."""
    image = decode_rgb(data, uri)
    if max_side and min(image.size) > max_side:
        image, data = bounded(image, max_side)
    return {"image": data, "label": record.label, "path": record.path, "side": side_bucket(*image.size),
            "sha256": hashlib.sha256(data).hexdigest()}


def split_classes(root: str, split: str) -> list[str]:
    """Sorted class folder names under ``root/split``."""
    try:
        return list_folders(join(root, split))
    except FileNotFoundError:
        raise DataError(f"{root}: no {split}/ folder (expected ROOT/train/<class>/<image> "
                        "and ROOT/val/<class>/<image>)") from None


def list_classes(root: str, selection: list[str] | None = None) -> list[str]:
    """Sorted class folder names under ``root/train``, or ``selection``, in its order, each
    checked to be one of them; :class:`DataError` when there are fewer than 2."""
    classes = split_classes(root, "train")
    if selection:
        missing = [name for name in selection if name not in classes]
        if missing or len(set(selection)) != len(selection):
            raise DataError(f"{join(root, 'train')}: selected classes {missing or selection} are not "
                            f"{'class folders' if missing else 'distinct'} (it has {', '.join(classes[:10])}"
                            f"{', ...' if len(classes) > 10 else ''})")
        classes = list(selection)
    if len(classes) < 2:
        raise DataError(f"{join(root, 'train')}: {len(classes)} class folder{'s' if not classes else ''} "
                        f"({', '.join(classes) or 'none'}); a classifier needs at least 2")
    return classes


def list_images(root: str, classes: list[str], follow_links: bool = False) -> list[ImageRecord]:
    """Every image of both splits, in a stable order.

    Files without an image extension are skipped, with one warning that counts them.
    Raises :class:`DataError` when a split is missing, when ``val/`` has other
    classes than ``train/``, when a class folder (of ``classes``, which may
    be a selection of them) holds no image, or when an image is a link out of
    ``root`` (unless ``follow_links``, :func:`~kd_lib.io.fs.inside_root`).
    """
    records, skipped = [], []
    check_inside = inside_root(root, follow_links)
    expected = split_classes(root, "train")
    for split in SPLITS:
        found = split_classes(root, split)
        if found != expected:
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise DataError(f"{join(root, split)}: classes differ from train/: "
                            f"missing {missing}, unexpected {extra}")
        for label, name in enumerate(classes):
            listed = list_files(join(root, split, name))
            files = [f for f in listed if f.lower().endswith(IMAGE_EXTENSIONS)]
            skipped += [f"{split}/{name}/{f}" for f in listed if not f.lower().endswith(IMAGE_EXTENSIONS)]
            if not files:
                raise DataError(f"empty class folder {join(root, split, name)}: no images "
                                f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            for f in files:
                path = f"{split}/{name}/{f}"
                check_inside(path, join(root, path))
                records.append(ImageRecord(split, path, label))
    if skipped:
        log.warning("%s: skipped %d files that are not images by their extension (%s), e.g. %s", root,
                    len(skipped), ", ".join(IMAGE_EXTENSIONS), skipped[0])
    return records

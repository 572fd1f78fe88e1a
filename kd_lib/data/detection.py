"""Detection datasets over fsspec: COCO JSON, and YOLO txt labels converted on read.

Both readers give a :class:`DetectionSet`: category names in label order and,
per image, its relative path, size and annotations, boxes as absolute
``(x1, y1, x2, y2)`` pixels. Boxes are handled as COCO's tools do:

- a box that crosses the image border is clipped to the image (torchvision's
  COCO reference clamps boxes the same way);
- a box with no area left (``x2 <= x1`` or ``y2 <= y1``, before or after
  clipping) is dropped: nothing can match it (torchvision's reference keeps
  only boxes with ``x2 > x1`` and ``y2 > y1``);
- a crowd box (``iscrowd: 1``) is kept and flagged: COCO evaluation uses it as
  an ignore region (a detection on it is neither a hit nor a false positive),
  and training leaves it out of the targets.

Nothing is dropped or changed silently: :attr:`DetectionSet.adjusted` counts
each case, and the readers log the counts with the file they came from.
"""

from __future__ import annotations

import json
import logging
import posixpath
import warnings
from collections import Counter
from dataclasses import dataclass, field

import yaml
from PIL import Image

from kd_lib.config import ConfigError
from kd_lib.data.imagefolder import IMAGE_EXTENSIONS, DataError
from kd_lib.io.fs import exists, filesystem, inside_root, join, read_text

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


@dataclass
class DetectionImage:
    """One image: ``path`` relative to the image root, its size, and its annotations."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)


@dataclass
class DetectionSet:
    """Category names (index = label), the images under ``root``, and what reading adjusted."""

    root: str
    categories: list[str]
    images: list[DetectionImage]
    adjusted: Counter = field(default_factory=Counter)


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """``box`` clipped to the ``width x height`` image, or ``None`` when no area is left."""
    x1, y1, x2, y2 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _add(image: DetectionImage, box: Box, label: int, crowd: bool, area: float | None,
         adjusted: Counter) -> None:
    """Append one annotation to ``image`` after clipping, counting what was changed."""
    clipped = clip_box(box, image.width, image.height)
    if clipped is None:
        adjusted["degenerate boxes dropped"] += 1
        return
    if clipped != box:
        adjusted["boxes clipped to the image"] += 1
    if crowd:
        adjusted["crowd boxes (ignored by evaluation, left out of training)"] += 1
    image.boxes.append(clipped)
    image.labels.append(label)
    image.crowd.append(crowd)
    image.areas.append(area if area is not None and clipped == box
                       else (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]))


def _log_adjusted(source: str, dataset: DetectionSet) -> None:
    for reason, count in sorted(dataset.adjusted.items()):
        log.warning("%s: %d %s", source, count, reason)


def _field(record: dict, key: str, where: str):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DataError(f"{where}: missing {key!r}") from None


def _bbox(value, where: str) -> Box:
    """A COCO ``bbox``: four numbers ``[x, y, width, height]``."""
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {value!r}")
    return tuple(float(v) for v in value)


def read_coco(annotations: str, images: str, follow_links: bool = False) -> DetectionSet:
    """A COCO ``instances_*.json`` at ``annotations``, its images under ``images``.

    Labels follow the categories sorted by COCO id (so ``label + 1`` is the
    id for the usual contiguous 1..80 ids); ``area`` is COCO's own when the
    box was not clipped, since COCO's size ranges (small, medium, large) use it.

    Raises:
        DataError: the file is not JSON, a required key is missing, an
            annotation names an unknown image or category (the message names
            the file and the annotation's id), or a ``file_name`` leads out of
            ``images`` (:func:`~kd_lib.io.fs.inside_root`; ``follow_links``
            allows links out).
    """
    try:
        data = json.loads(read_text(annotations))
    except json.JSONDecodeError as err:
        raise DataError(f"{annotations}: not JSON ({err})") from None
    categories = sorted(_field(data, "categories", annotations), key=lambda c: _field(c, "id", annotations))
    label_of = {c["id"]: label for label, c in enumerate(categories)}
    by_id: dict[int, DetectionImage] = {}
    check_inside = inside_root(images, follow_links)
    for record in _field(data, "images", annotations):
        where = f"{annotations}: image {record.get('id')!r}"
        check_inside(str(_field(record, "file_name", where)), f"{where}: file_name")
        by_id[_field(record, "id", where)] = DetectionImage(
            record["id"], _field(record, "file_name", where), int(_field(record, "width", where)),
            int(_field(record, "height", where)))
    dataset = DetectionSet(images, [_field(c, "name", annotations) for c in categories], list(by_id.values()))
    for record in _field(data, "annotations", annotations):
        where = f"{annotations}: annotation {record.get('id')!r}"
        image = by_id.get(_field(record, "image_id", where))
        if image is None:
            raise DataError(f"{where} names image {record['image_id']!r}, which is not in 'images'")
        if _field(record, "category_id", where) not in label_of:
            raise DataError(f"{where} names category {record['category_id']!r}, which is not in 'categories'")
        x, y, w, h = _bbox(_field(record, "bbox", where), where)
        _add(image, (x, y, x + w, y + h), label_of[record["category_id"]], bool(record.get("iscrowd", 0)),
             record.get("area"), dataset.adjusted)
    _log_adjusted(annotations, dataset)
    return dataset


def image_size(fs, path: str, uri: str) -> tuple[int, int]:
    """The size of the image at ``path`` on ``fs`` from its header; :class:`DataError` naming ``uri``
    when it does not decode or is a decompression bomb."""
    try:
        with warnings.catch_warnings(), fs.open(path, "rb") as f:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(f).size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(f"{uri}: refused, a possible decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt image {uri}: {err}") from None


def _yolo_names(root: str) -> list[str]:
    """Class names from ``data.yaml`` (``names``: a list or an index mapping) or ``classes.txt``."""
    if exists(join(root, "data.yaml")):
        names = yaml.safe_load(read_text(join(root, "data.yaml"))).get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            raise DataError(f"{join(root, 'data.yaml')}: 'names' must be a non-empty list or mapping")
        return [str(n) for n in names]
    if exists(join(root, "classes.txt")):
        return [line.strip() for line in read_text(join(root, "classes.txt")).splitlines() if line.strip()]
    raise DataError(f"{root}: no data.yaml or classes.txt with the class names")


def read_yolo(root: str, split: str, follow_links: bool = False) -> DetectionSet:
    """YOLO layout: ``images/SPLIT/*`` and ``labels/SPLIT/<stem>.txt`` under ``root``.

    Each label line is ``class cx cy w h``, the centre and size normalized by
    the image's side; they become absolute corner boxes (the image's size is
    read from its header). An image without a label file has no objects.

    Raises:
        DataError: no images, a malformed line (the message names the file
            and line), a class index outside the names, or an image or label
            file that links out of ``root`` (unless ``follow_links``).
    """
    names = _yolo_names(root)
    fs, base = filesystem(root)
    image_dir = posixpath.join(base, "images", split)
    paths = sorted(p for p in fs.find(image_dir) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"{join(root, 'images', split)}: no images")
    dataset = DetectionSet(root, names, [])
    check_inside = inside_root(root, follow_links)
    for image_id, path in enumerate(paths):
        relative = posixpath.relpath(path, base)
        check_inside(relative, join(root, relative))
        width, height = image_size(fs, path, join(root, relative))
        image = DetectionImage(image_id, relative, width, height)
        stem = posixpath.splitext(posixpath.relpath(path, image_dir))[0]
        label = posixpath.join("labels", split, f"{stem}.txt")
        label_uri = join(root, label)
        if exists(label_uri):
            check_inside(label, label_uri)
            for number, line in enumerate(read_text(label_uri).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    cls, cx, cy, w, h = line.split()
                    label, cx, cy, w, h = int(cls), float(cx), float(cy), float(w), float(h)
                except ValueError:
                    raise DataError(f"{label_uri}:{number}: expected 'class cx cy w h', got {line!r}") from None
                if not 0 <= label < len(names):
                    raise DataError(f"{label_uri}:{number}: class {label} is not in 0..{len(names) - 1}")
                box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
                _add(image, box, label, False, None, dataset.adjusted)
        dataset.images.append(image)
    _log_adjusted(join(root, "labels", split), dataset)
    return dataset


def keep_categories(dataset: DetectionSet, names: list[str]) -> DetectionSet:
    """``dataset`` with only the categories ``names``, relabelled in that order.

    Every image stays (one with none of these objects is a background image);
    the annotations of other categories are left out, and counted.

    Raises:
        ConfigError: a name that is not a category of the dataset (field ``categories``).
    """
    unknown = [name for name in names if name not in dataset.categories]
    if unknown:
        raise ConfigError("categories", f"{dataset.root} has no categories {unknown}; it has {dataset.categories}")
    new_label = {dataset.categories.index(name): label for label, name in enumerate(names)}
    adjusted = Counter(dataset.adjusted)
    images = []
    for image in dataset.images:
        kept = [i for i, label in enumerate(image.labels) if label in new_label]
        adjusted["annotations of other categories left out"] += len(image.labels) - len(kept)
        images.append(DetectionImage(image.image_id, image.path, image.width, image.height,
                                     [image.boxes[i] for i in kept], [new_label[image.labels[i]] for i in kept],
                                     [image.crowd[i] for i in kept], [image.areas[i] for i in kept]))
    result = DetectionSet(dataset.root, list(names), images, adjusted)
    log.warning("%s: %d annotations of other categories left out (keeping %s)", dataset.root,
                adjusted["annotations of other categories left out"], ", ".join(names))
    return result

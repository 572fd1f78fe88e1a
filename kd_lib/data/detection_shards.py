"""Prepared detection data: a :class:`DetectionSet` letterboxed and packed into Parquet shards.

``prepare_detection`` reads every image once, letterboxes it to a square of
``image_size`` pixels (scaled so its longer side fits, pasted at the top-left
of a canvas of the ImageNet mean colour) and writes
``{split}-{i:05d}.parquet`` files plus ``manifest.json`` last, with the
same atomicity as :func:`kd_lib.data.shards.prepare_imagefolder`. Boxes are
stored in the letterboxed pixel coordinates, so teacher (HR) and student (LR)
detections are evaluated on one frame: a detection ``d`` on the letterboxed
image is at ``d / scale`` on the source image.

:class:`DetectionShardDataset` gives ``(image, target)`` items for training,
the image as uint8 ``(S, S, 3)`` (its ``pairing`` makes the HR and LR batches
on the training device), and the split's ground truth for
:func:`kd_lib.eval.detection.coco_map`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import Counter
from functools import partial
from operator import attrgetter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from kd_lib.data.detection import DetectionImage, DetectionSet
from kd_lib.data.imagefolder import SPLITS, DataError, decode_rgb
from kd_lib.data.parallel import OrderedPool
from kd_lib.data.shards import ShardWriter, StreamedSplit
from kd_lib.data.transforms import PairedResize
from kd_lib.io.fs import join
from kd_lib.io.manifest import read_manifest
from kd_lib.ops import ResizeMode

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("image", pa.binary()), ("image_id", pa.int64()), ("path", pa.string()),
                    ("scale", pa.float32()), ("boxes", pa.list_(pa.float32())), ("labels", pa.list_(pa.int32())),
                    ("crowd", pa.list_(pa.bool_())), ("areas", pa.list_(pa.float32()))])
#: The ImageNet mean as 8-bit RGB: the padding is what a normalized input reads as zero.
PAD_COLOUR = (124, 116, 104)
JPEG_QUALITY = 95
DEGENERATE = "boxes degenerate after letterboxing, dropped"
#: The detectors normalize inside (their transform), so they read images in [0, 1].
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def in_val(path: str, val_fraction: float) -> bool:
    """Whether ``path`` goes to the val split: a hash of the path, so adding images moves none."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def _splits(dataset: DetectionSet, val: DetectionSet | None,
            val_fraction: float) -> dict[str, tuple[DetectionSet, list[DetectionImage]]]:
    """Each split's source set and images; :class:`DataError` if a split is empty."""
    if val is not None:
        if val.categories != dataset.categories:
            raise DataError(f"{val.root}: val categories differ from those of {dataset.root}")
        splits = {"train": (dataset, dataset.images), "val": (val, val.images)}
    else:
        splits = {split: (dataset, [i for i in dataset.images if in_val(i.path, val_fraction) == (split == "val")])
                  for split in SPLITS}
    for split, (source, images) in splits.items():
        if not images:
            if val is not None:
                hint = f"the {split} set has no images"
            elif split == "val":
                hint = f"no image's path hash falls under val_fraction {val_fraction}: raise it, or pass val"
            else:
                hint = f"every image went to val with val_fraction {val_fraction}: lower it"
            raise DataError(f"{source.root}: the {split} split is empty ({hint})")
    train_source, train_images = splits["train"]
    if all(crowd for image in train_images for crowd in image.crowd):
        raise DataError(f"{train_source.root}: the train split has no boxes to learn from (no annotations, or "
                        "none of the kept categories): a detector needs labelled objects")
    return splits


def warn_small_images(splits: dict[str, tuple[DetectionSet, list[DetectionImage]]], size: int) -> None:
    """Warn when images are far smaller than the letterbox side ``size`` (their longer side under
    half of it): they are upsampled more than 2x."""
    small = [image for _, images in splits.values() for image in images if 2 * max(image.width, image.height) < size]
    if small:
        total = sum(len(images) for _, images in splits.values())
        log.warning("%d of %d images have a longer side under %d px, far smaller than image_size %d (they are "
                    "upsampled more than 2x), e.g. %s (%dx%d)", len(small), total, size // 2, size, small[0].path,
                    small[0].width, small[0].height)


def letterbox(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    """``image`` scaled so its longer side is ``size`` and pasted at the top-left of a
    ``size x size`` canvas of :data:`PAD_COLOUR`; the canvas and the scale."""
    scale = size / max(image.width, image.height)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    canvas.paste(resized, (0, 0))
    return canvas, scale


def letterboxed_row(image: DetectionImage, data: bytes, uri: str, size: int) -> dict:
    """One image and its bytes, read from ``uri`` -> its shard row: the letterboxed JPEG bytes and
    scaled annotations, plus ``sha256`` (of ``data``) and ``dropped``, the number of its boxes that
    letterboxing made degenerate. The per-image work of :func:`prepare_detection`, run in its worker
    processes."""
    decoded = decode_rgb(data, uri)
    if decoded.size != (image.width, image.height):
        raise DataError(f"{uri}: the image is {decoded.width}x{decoded.height} but its annotations say "
                        f"{image.width}x{image.height}")
    canvas, scale = letterbox(decoded, size)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    boxes = np.clip(np.asarray(image.boxes, dtype=np.float64).reshape(-1, 4) * scale, 0, size).astype(np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    areas = (np.asarray(image.areas, dtype=np.float64) * scale**2).astype(np.float32)
    return {"image": buffer.getvalue(), "image_id": image.image_id, "path": image.path, "scale": scale,
            "boxes": boxes[keep].reshape(-1).tolist(), "labels": np.asarray(image.labels)[keep].tolist(),
            "crowd": np.asarray(image.crowd, dtype=bool)[keep].tolist(), "areas": areas[keep].tolist(),
            "sha256": hashlib.sha256(data).hexdigest(), "dropped": int((~keep).sum())}


def prepare_detection(dataset: DetectionSet, out: str, image_size: int, *, source: str,
                      val: DetectionSet | None = None, val_fraction: float = 0.2,
                      shard_size: int = 1024, num_workers: int = 0) -> dict:
    """Letterbox ``dataset`` to ``image_size`` and publish it as shards under ``out``.

    ``num_workers`` processes decode and letterbox the images and write the
    shards, one shard a task (0: this process); the shards and the
    fingerprint do not depend on it (:class:`~kd_lib.data.parallel.OrderedPool`).

    ``val`` is the val split when given (``dataset`` is then all train);
    otherwise an image goes to val when a hash of its path falls under
    ``val_fraction``. ``source`` is recorded in the manifest (where the data
    came from). The fingerprint covers ``image_size``, the category names
    and every image's split, path, bytes hash and annotations, so the same
    data at another URI has the same fingerprint.

    On any error, the shards written so far are removed and no manifest is
    written; the error names the offending file. An earlier output under
    ``out`` stays whole until the new manifest replaces it; its shards are
    removed after that.

    Raises:
        DataError: a split is empty, the train split has no (non-crowd) box,
            the val categories differ, an image is corrupt or its size differs
            from its annotations.
    """
    splits = _splits(dataset, val, val_fraction)
    warn_small_images(splits, image_size)
    digest = hashlib.sha256(json.dumps({"image_size": image_size, "categories": dataset.categories}).encode())
    adjusted = Counter(dataset.adjusted) + Counter(val.adjusted if val is not None else {})
    info: dict[str, dict] = {}
    with ShardWriter(out, SCHEMA) as writer, OrderedPool(num_workers) as pool:
        # closed on an error too: its line ends before the error is printed
        with tqdm(total=sum(len(images) for _, images in splits.values()), desc="prepare-data",
                  unit="img") as progress:
            for split, (split_source, images) in splits.items():
                boxes = 0
                for image, kept in writer.write_split(pool, split, split_source.root, images, shard_size,
                                                      partial(letterboxed_row, size=image_size), attrgetter("path")):
                    digest.update(json.dumps([split, image.path, kept["sha256"], image.image_id,
                                              image.boxes, image.labels, image.crowd, image.areas]).encode() + b"\n")
                    if kept["dropped"]:
                        adjusted[DEGENERATE] += kept["dropped"]
                        log.warning("%s: %d %s to %d px", join(split_source.root, image.path), kept["dropped"],
                                    DEGENERATE, image_size)
                    boxes += len(image.labels) - kept["dropped"]
                    progress.update()
                info[split] = {"images": len(images), "boxes": boxes, "shards": writer.shards[split]}
    return writer.publish(digest.hexdigest(), {"task": "detection", "source": source, "classes": dataset.categories,
                                               "num_classes": len(dataset.categories), "image_size": image_size,
                                               "splits": info, "adjusted": dict(sorted(adjusted.items()))})


def _ragged(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as its flat values and per-row offsets (row ``i`` is ``values[o[i]:o[i + 1]]``)."""
    array = column.combine_chunks()
    lengths = array.value_lengths().to_numpy(zero_copy_only=False)
    return array.flatten().to_numpy(zero_copy_only=False), np.concatenate([[0], np.cumsum(lengths)])


class DetectionShardDataset(StreamedSplit):
    """One split of prepared detection data (streamed, see :class:`~kd_lib.data.shards.StreamedSplit`);
    items are ``(image, target)``.

    ``image`` is the letterboxed image as uint8 ``(S, S, 3)`` and ``target``
    holds the non-crowd ``boxes`` (float32 (M, 4), HR pixels), their
    ``labels`` (int64) and the ``image_id``. With ``train``, a horizontal
    flip of both with probability 1/2 drawn from the item's seed, as in
    :class:`kd_lib.data.transforms.CropTransform`. Indices are ``(index,
    seed)`` pairs or plain ints (seed 0).

    ``pairing`` makes, on the training device, the HR batch (in [0, 1], as
    the detectors take it) and the LR batch (downsampled by ``ratio`` with
    ``resize``; the HR batch itself at ratio 1) of a batch of images
    (:func:`kd_lib.engine.loop.paired_batches`).

    Opening reads the annotations; decoding happens per item, in the
    loader's workers.
    """

    def __init__(self, data: str, split: str, ratio: int = 1, train: bool = False, resize: ResizeMode = "bilinear"):
        manifest = read_manifest(data)
        if manifest.get("task") != "detection":
            raise DataError(f"{data}: not prepared detection data (task {manifest.get('task')!r}); "
                            "prepare it with prepare_detection")
        if split not in manifest["splits"]:
            raise DataError(f"{data}: no split {split!r} (it has {sorted(manifest['splits'])})")
        self.image_size: int = manifest["image_size"]
        if ratio < 1 or self.image_size % ratio:
            raise DataError(f"{data}: image_size {self.image_size} is not divisible by ratio {ratio}")
        super().__init__(data, split, ["image_id", "path", "labels", "boxes", "crowd", "areas"], SCHEMA, manifest)
        self.classes: list[str] = self.manifest["classes"]
        self.train = train
        self.pairing = PairedResize(ratio, resize, UNIT_MEAN, UNIT_STD)
        self.image_ids: list[int] = self.table.column("image_id").to_pylist()
        self.paths: list[str] = self.table.column("path").to_pylist()
        self.labels, self.offsets = _ragged(self.table.column("labels"))
        self.boxes = _ragged(self.table.column("boxes"))[0].reshape(-1, 4)
        self.crowd = _ragged(self.table.column("crowd"))[0]
        self.areas = _ragged(self.table.column("areas"))[0]

    def _annotations(self, index: int) -> slice:
        """Where image ``index``'s boxes are in the flat annotation arrays."""
        return slice(self.offsets[index], self.offsets[index + 1])

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image = decode_rgb(self.encoded(index)[0], join(self.data, self.paths[index]))
        pixels = torch.from_numpy(np.array(image))
        rows = self._annotations(index)
        keep = ~self.crowd[rows]
        boxes = torch.from_numpy(self.boxes[rows][keep].copy())
        labels = torch.from_numpy(self.labels[rows][keep].astype(np.int64))
        if self.train and random.Random(seed).random() < 0.5:
            pixels = pixels.flip(1)
            size = self.image_size
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
        return pixels, {"boxes": boxes, "labels": labels, "image_id": self.image_ids[index]}

    def ground_truth(self) -> DetectionSet:
        """The split in letterboxed coordinates (``S x S`` images), crowd boxes included and
        flagged: ``coco_map(dataset.ground_truth(), detections)`` scores detections on the HR image."""
        images = []
        for index, (image_id, path) in enumerate(zip(self.image_ids, self.paths)):
            rows = self._annotations(index)
            images.append(DetectionImage(image_id, path, self.image_size, self.image_size,
                                         [tuple(box) for box in self.boxes[rows].tolist()],
                                         self.labels[rows].tolist(), self.crowd[rows].tolist(),
                                         self.areas[rows].tolist()))
        return DetectionSet(self.data, self.classes, images)


def collate_detection(batch) -> tuple[torch.Tensor, list[dict]]:
    """Items of :class:`DetectionShardDataset` -> the images stacked, uint8 ``(N, S, S, 3)``, and the
    targets as a list."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)

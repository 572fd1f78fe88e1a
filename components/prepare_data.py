"""prepare-data: validate a dataset (any fsspec URI) and publish it as Parquet shards.

The shards come with a manifest holding the class names and a content fingerprint.
Every image is decoded once: a corrupt image, an empty class folder or
classes that differ between splits stop the stage with an error naming the
file or folder, and nothing is published. ``num_workers`` processes each make
whole shards (read, decode, check, letterbox, write); the shards and the
fingerprint are the same whatever their number.

Classification: ``source`` is an ImageFolder root with train/ and val/;
``max_per_class`` keeps the first N images of each class in each split (0:
all); ``categories`` keeps only the named class folders, labelled in that
order (``[cat, dog]``: a two-class task); ``max_side`` stores images whose
shorter side is longer resized to it (bounded resolution), which the training
stages check their ``hr_size`` against.

Detection: ``source`` is a COCO ``instances_*.json`` (its images under
``images``) or a YOLO root (``data.yaml`` or ``classes.txt``, ``images/`` and
``labels/``). Images are letterboxed to ``image_size`` px. The val split is
``val_annotations``/``val_images`` (COCO) or ``images/val`` (YOLO) when
given, else a stable ``val_fraction`` of the images chosen by a hash of
their paths. ``categories`` keeps only the named categories (``[person]``: a
person detector), in that order; images without them stay as backgrounds.
Boxes crossing the image are clipped, empty ones dropped and crowd boxes kept
as ignore regions; every such change is counted in the log and the manifest
(``adjusted``).

Every image (and YOLO label) a dataset names must lie inside its root: an
entry with ``..``, an absolute path or a symbolic link out of the root stops
the stage naming the file and the entry before anything outside is opened;
``follow_links`` allows links out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from components.common import OutputSettings, preflight
from components.stage import Stage
from kd_lib.config import check
from kd_lib.data.detection import DetectionSet, keep_categories, read_coco, read_yolo
from kd_lib.data.detection_shards import prepare_detection
from kd_lib.data.shards import prepare_imagefolder
from kd_lib.io.fs import exists, join


@dataclass
class PrepareDataConfig(OutputSettings):
    source: str = ""
    """the dataset: an ImageFolder root, a COCO instances JSON or a YOLO root (any fsspec URI)"""
    out: str = ""
    """where the shards and the manifest go"""
    format: Literal["auto", "imagefolder", "coco", "yolo"] = "auto"
    """the source's format; auto: COCO for a .json, YOLO for a data.yaml or classes.txt, else ImageFolder"""
    shard_size: int = 1024
    """images per Parquet shard, the unit of work of one worker (ImageNet: about 110 MB a shard)"""
    max_per_class: int = 0
    """classification: keep the first N images of each class in each split (0: all)"""
    max_side: int = 0
    """classification: store each image whose shorter side is longer than N px resized to N there, as a JPEG
    of quality 90 (0: every image as it is). FFCV's bounded resolution, on the shorter side rather than the
    longer: the evaluation crop and the random training crops take their pixels across it, so a training
    stage takes any hr_size up to N (a larger one is refused: its validation crops would all be upsampled),
    and N >= hr_size / sqrt(crop_scale) keeps a square crop of the smallest area at hr_size px or more (379
    for hr_size 224 at the default crop_scale 0.35). No default is derived from them: prepare-data does not
    know the hr_size of the stages that will read the data"""
    images: str = ""
    """COCO: the folder of the JSON's images"""
    val_annotations: str = ""
    """COCO: the val split's instances JSON ('': a val_fraction of the images)"""
    val_images: str = ""
    """COCO: the folder of the val split's images"""
    image_size: int = 256
    """detection: the side of the letterboxed HR images, in px"""
    val_fraction: float = 0.2
    """detection without a val split: the share of images held out, chosen by a hash of their paths"""
    categories: list[str] = field(default_factory=list)
    """detection: keep only these categories, in this order (empty: all)"""
    num_workers: int = 0
    """processes that make the shards: read, decode, check, letterbox, write (0: this one); the output does not
    depend on it"""
    follow_links: bool = False
    """follow symbolic links that lead out of the dataset (else such a link, like a '..' entry, is an error)"""

    def validate(self) -> None:
        self.validate_output()
        check(bool(self.source), "source", "is required: an ImageFolder root, a COCO JSON file or a YOLO root")
        check(bool(self.out), "out", "is required: where the shards and manifest go")
        check(self.format in ("auto", "imagefolder", "coco", "yolo"), "format",
              f"must be auto, imagefolder, coco or yolo, got {self.format!r}")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0 (0: this process), got {self.num_workers}")
        check(self.max_per_class >= 0, "max_per_class", f"must be >= 0 (0: all), got {self.max_per_class}")
        check(self.max_side >= 0, "max_side", f"must be >= 0 (0: the images as they are), got {self.max_side}")
        check(self.image_size >= 32, "image_size", f"must be >= 32, got {self.image_size}")
        check(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(not self.max_side or self.resolved_format() == "imagefolder", "max_side",
              f"bounds an ImageFolder's images; a detection source's are letterboxed to image_size "
              f"({self.image_size}), got max_side {self.max_side}")
        if self.resolved_format() == "coco":
            check(bool(self.images), "images", "is required with a COCO source: the folder of its images")
            check(not self.val_annotations or bool(self.val_images), "val_images",
                  "is required with val_annotations: the folder of the val images")

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.source.lower().endswith(".json"):
            return "coco"
        if exists(join(self.source, "data.yaml")) or exists(join(self.source, "classes.txt")):
            return "yolo"
        return "imagefolder"


def read_detection(config: PrepareDataConfig) -> tuple[DetectionSet, DetectionSet | None]:
    """The detection set at ``source`` and its val split, if the source has one, with only
    ``categories`` when they are given."""
    if config.resolved_format() == "coco":
        val = (read_coco(config.val_annotations, config.val_images, config.follow_links)
               if config.val_annotations else None)
        train = read_coco(config.source, config.images, config.follow_links)
    else:
        val = (read_yolo(config.source, "val", config.follow_links)
               if exists(join(config.source, "images", "val")) else None)
        train = read_yolo(config.source, "train", config.follow_links)
    if config.categories:
        train, val = (keep_categories(d, config.categories) if d is not None else None for d in (train, val))
    return train, val


def run(config: PrepareDataConfig) -> dict:
    inputs = {name: getattr(config, name) for name in ("source", "images", "val_annotations", "val_images")
              if getattr(config, name)}
    preflight("prepare-data", config, inputs)
    if config.resolved_format() == "imagefolder":
        manifest = prepare_imagefolder(config.source, config.out, config.shard_size, config.max_per_class,
                                       config.categories, config.num_workers, config.follow_links, config.max_side)
    else:
        train, val = read_detection(config)
        manifest = prepare_detection(train, config.out, config.image_size, source=config.source, val=val,
                                     val_fraction=config.val_fraction, shard_size=config.shard_size,
                                     num_workers=config.num_workers)
    splits = manifest["splits"]
    print(f"prepare-data: {manifest['num_classes']} classes, {splits['train']['images']} train / "
          f"{splits['val']['images']} val images, fingerprint {manifest['data_fingerprint'][:12]}", file=sys.stderr)
    return manifest


STAGE = Stage("prepare-data", PrepareDataConfig, run, output="data")

if __name__ == "__main__":
    sys.exit(STAGE.main())

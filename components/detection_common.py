"""What the detection stages share: their config fields, data, training and publishing.

A detection stage reads prepared detection data (prepare-data with a COCO or
YOLO source: letterboxed HR images of side ``S`` and their boxes) and trains
a torchvision RetinaNet or FCOS with the shared training loop; the validation
metric is COCO mAP on the held-out split, on HR boxes. An LR model sees the
HR image downsampled by ``ratio`` and its boxes are scaled back to HR.

A model is published as a folder with ``model.pt`` (architecture spec,
classes, state dict), ``metrics.parquet`` and ``manifest.json`` last, keyed
like every stage (see :mod:`components.common`).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, replace
from typing import Literal

import pyarrow.parquet as pq
import torch

from components.common import TrainingOutputSettings, data_manifest
from kd_lib.config import check, check_name
from kd_lib.data.detection_shards import DetectionShardDataset, collate_detection
from kd_lib.data.imagefolder import DataError
from kd_lib.distill.detection import DetectorTraining
from kd_lib.engine.loop import fit, write_metrics
from kd_lib.engine.settings import TrainSettings
from kd_lib.eval.detection import detector_validation
from kd_lib.io.fs import join
from kd_lib.io.manifest import read_manifest, read_published
from kd_lib.models.detector_store import MODEL_FILE, DetectorSpec, load_detector, save_detector
from kd_lib.models.detectors import FPN_CHANNELS, accepted_backbones
from kd_lib.models.weights import load_backbone_weights, lr_scales, started_from, weights_fingerprint
from kd_lib.ops import ResizeMode

METRICS_FILE = "metrics.parquet"
#: The LR side must be a multiple of this, so that every level up to P5 has an exact grid and the
#: HR and LR anchors line up (P5 has stride 32).
SIDE_MULTIPLE = 32


@dataclass
class DetectionStageConfig(TrainSettings, TrainingOutputSettings):
    """Fields of every detection stage. Defaults: SGD lr 0.01, batch 8, weight decay 1e-4, the
    gradient norm clipped at 10 and a 50-step warm-up, a common from-scratch recipe for RetinaNet and
    FCOS (torchvision's reference warms up over 1000 iterations; the demo's runs are 150-300 steps).

    ``weights``: where the backbone starts from, a classification checkpoint's trunk (the
    classification pipeline's teacher, ``torchvision:DEFAULT``, a state dict, ...; see
    :mod:`kd_lib.models.weights`), random by default; its tensors train at ``weights_lr_scale x lr``,
    the FPN and the head at ``lr``."""

    data: str = ""
    """the prepare-data output URI (detection data)"""
    out: str = ""
    """where this stage writes its outputs"""
    kind: Literal["retinanet", "fcos"] = "fcos"
    """the detector: FCOS or RetinaNet, on an FPN"""
    backbone: str = "resnet18"
    """the FPN's backbone: a torchvision ResNet or MobileNet"""
    fpn_channels: int = FPN_CHANNELS
    """width of the feature pyramid and of the head's convolutions, a multiple of 32 (torchvision: 256)"""
    ratio: int = 2
    """the LR image is the HR one downsampled by this factor"""
    resize: ResizeMode = "bilinear"
    """how the LR image is made from the HR one"""
    checkpoint_root: str = ""
    """where checkpoints go ('': a checkpoints/ folder under out)"""
    batch_size: int = 8
    """images per step, over all processes together"""
    weight_decay: float = 1e-4
    """SGD weight decay"""
    grad_clip_norm: float = 10.0
    """clip the global gradient norm of each step to this (0: off)"""
    warmup_steps: int = 50
    """steps of linear warm-up from lr / 1000 (from scratch, FCOS's box branch can die without one)"""
    weights: str = ""
    """where the backbone starts from: "" random, torchvision:DEFAULT, or a classification model folder,
    state dict or .safetensors URI (its trunk)"""
    weights_lr_scale: float = 0.1
    """the lr of the backbone tensors taken from weights, as a fraction of lr (FPN and head train at lr)"""

    def validate(self) -> None:
        super().validate()
        self.validate_output()
        check(bool(self.data), "data", "is required: the prepare-data output URI (detection data)")
        check(bool(self.out), "out", "is required: where this stage writes its outputs")
        check(self.kind in ("retinanet", "fcos"), "kind", f"must be retinanet or fcos, got {self.kind!r}")
        check(self.fpn_channels > 0 and self.fpn_channels % 32 == 0, "fpn_channels",
              f"must be a positive multiple of 32, got {self.fpn_channels}")
        check(0 < self.weights_lr_scale <= 1, "weights_lr_scale", f"must be in (0, 1], got {self.weights_lr_scale}")
        check(self.ratio in (1, 2, 4, 8), "ratio", f"must be 1, 2, 4 or 8 (a power of two), got {self.ratio}")
        check_name(self.backbone, accepted_backbones(), "backbone",
                   "detector backbone (a torchvision ResNet or MobileNet)")


@dataclass
class DetectionData:
    """The prepared data's class names, HR side, fingerprint and the two splits at one ratio."""

    classes: list[str]
    image_size: int
    fingerprint: str
    train: DetectionShardDataset
    val: DetectionShardDataset

    @classmethod
    def load(cls, config: DetectionStageConfig) -> DetectionData:
        manifest = data_manifest(config.data, "detection")
        size = manifest["image_size"]
        if size % (config.ratio * SIDE_MULTIPLE):
            raise DataError(f"{config.data}: images of {size} px at ratio {config.ratio} give an LR side of "
                            f"{size / config.ratio:g} px; it must be a multiple of {SIDE_MULTIPLE}: prepare the "
                            f"data at a multiple of {config.ratio * SIDE_MULTIPLE} px")
        train, val = (DetectionShardDataset(config.data, split, config.ratio, train=split == "train",
                                            resize=config.resize) for split in ("train", "val"))
        return cls(manifest["classes"], size, manifest["data_fingerprint"], train, val)


def load_upstream_detector(uri: str, field: str, classes: list[str]
                           ) -> tuple[torch.nn.Module, DetectorSpec, str, dict]:
    """An upstream detector, its spec, its fingerprint and its metadata, checked against the data's classes."""
    manifest = read_manifest(uri)
    model, spec, meta = load_detector(uri)
    if meta["classes"] != classes:
        raise DataError(f"{field} at {uri} detects {len(meta['classes'])} classes, but the data has "
                        f"{len(classes)}: they must be the same classes in the same order")
    return model, spec, manifest["fingerprint"], meta


def start_backbone(model: torch.nn.Module, spec: DetectorSpec, config: DetectionStageConfig
                   ) -> tuple[str, dict[int, float]]:
    """Load ``config.weights`` into the backbone of ``model`` (nothing when empty); returns what
    the model started from and the lr factors of its parameters (a task's ``lr_scales``)."""
    if not config.weights:
        return started_from(""), {}
    report = load_backbone_weights(model, spec.backbone, config.weights)
    print(f"backbone weights {report.summary()}", file=sys.stderr)
    return started_from(config.weights), lr_scales(model, report, config.weights_lr_scale)


def stage_inputs(config: DetectionStageConfig, **inputs: str) -> dict[str, str]:
    """A detection stage's key inputs: ``inputs`` and the fingerprint of its weights, if any."""
    return {**inputs, **({"weights": weights_fingerprint(config.weights)} if config.weights else {})}


def train(task: DetectorTraining, data: DetectionData, config: DetectionStageConfig, checkpoint_dir: str,
          desc: str, epochs: int | None = None) -> list[dict]:
    """Train ``task`` with the shared loop; validation is COCO mAP of its student on its view."""
    settings = config if epochs is None else replace(config, epochs=epochs)
    validate = detector_validation(data.val, task.view, num_workers=config.num_workers)
    return fit(task, data.train, settings, checkpoint_dir, validate, desc=desc, collate_fn=collate_detection)


def write_detector(out: str, model: torch.nn.Module, spec: DetectorSpec, data: DetectionData, rows: list[dict],
                   **info) -> list[str]:
    """Write ``model.pt`` and ``metrics.parquet`` under ``out``; returns their names."""
    save_detector(out, model.cpu(), spec, data.classes, hr_size=data.image_size, **info)
    write_metrics(rows, join(out, METRICS_FILE))
    return [MODEL_FILE, METRICS_FILE]


def read_rows(out: str) -> list[dict]:
    """The metrics rows that :func:`write_detector` wrote under ``out``."""
    return pq.read_table(io.BytesIO(read_published(out, METRICS_FILE))).to_pylist()

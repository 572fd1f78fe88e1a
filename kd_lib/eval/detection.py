"""COCO mAP of detections against a :class:`~kd_lib.data.detection.DetectionSet`.

The standard COCO box evaluation (faster-coco-eval, which gives the same
numbers as pycocotools, faster): AP averaged over IoU 0.50:0.95, AP at 0.50
and 0.75, and AP for small, medium and large objects (areas under 32^2,
32^2 to 96^2, above 96^2 pixels). Crowd boxes are ignore regions, as in COCO.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import nn
from tqdm import tqdm

from kd_lib.data.detection import Box, DetectionSet
from kd_lib.data.detection_shards import collate_detection
from kd_lib.engine.loop import paired_batches

#: Summary keys, in COCO's order, and faster-coco-eval's names for them.
METRICS = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
           "APl": "AP_large"}


@dataclass
class Detection:
    """One predicted box on image ``image_id``: absolute ``(x1, y1, x2, y2)``, label, score."""

    image_id: int
    box: Box
    label: int
    score: float


def _xywh(box: Box) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_ground_truth(dataset: DetectionSet) -> dict:
    """The dataset as a COCO annotation dict (category id = label + 1)."""
    images, annotations = [], []
    for image in dataset.images:
        images.append({"id": image.image_id, "file_name": image.path, "width": image.width,
                       "height": image.height})
        for box, label, crowd, area in zip(image.boxes, image.labels, image.crowd, image.areas):
            annotations.append({"id": len(annotations) + 1, "image_id": image.image_id, "category_id": label + 1,
                                "bbox": _xywh(box), "area": area, "iscrowd": int(crowd)})
    categories = [{"id": label + 1, "name": name} for label, name in enumerate(dataset.categories)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_map(dataset: DetectionSet, detections: Iterable[Detection]) -> dict[str, float | None]:
    """``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1]; ``None`` where the
    dataset has no (non-crowd) object of that size. No detections: every AP is 0.

    Raises:
        ValueError: a detection names an image that is not in the dataset.
    """
    image_ids = {image.image_id for image in dataset.images}
    results = []
    for d in detections:
        if d.image_id not in image_ids:
            raise ValueError(f"detection on image {d.image_id}, which is not in the dataset")
        results.append({"image_id": d.image_id, "category_id": d.label + 1, "bbox": _xywh(d.box),
                        "score": d.score})
    ground_truth = COCO(coco_ground_truth(dataset))
    evaluation = COCOeval_faster(ground_truth, ground_truth.loadRes(results), iouType="bbox",
                                 print_function=lambda *args: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = evaluation.stats_as_dict
    return {key: (None if stats[name] < 0 else float(stats[name])) for key, name in METRICS.items()}


def detect(detector: nn.Module, loader: Iterable[tuple[torch.Tensor, list[dict]]],
           pairing: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], view: str,
           device: torch.device | str) -> list[Detection]:
    """Every detection of ``detector`` on ``loader``'s ``(images, targets)`` batches, in HR pixels.

    The images (uint8 ``(N, S, S, 3)``, as :func:`collate_detection` stacks
    them) are moved to ``device`` and made into the HR and LR batches there by
    ``pairing`` (the dataset's, see :func:`kd_lib.engine.loop.paired_batches`).
    The detector reads the ``view`` image (``"hr"`` or ``"lr"``); boxes on the
    LR image are scaled back by the HR side over the LR side, so that every
    model is scored against the same HR ground truth. Runs in eval mode under
    inference mode and gives the detector its training flag back.
    """
    was_training = detector.training
    detector.eval()
    detections = []
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc=f"detect {view}", unit="batch", leave=False, file=sys.stderr, disable=None)
            for hr, lr, targets in paired_batches(bar, pairing, device):
                images = hr if view == "hr" else lr
                scale = hr.shape[-1] / images.shape[-1]
                for target, found in zip(targets, detector(list(images))):
                    for box, label, score in zip((found["boxes"] * scale).tolist(), found["labels"].tolist(),
                                                 found["scores"].tolist()):
                        detections.append(Detection(int(target["image_id"]), tuple(box), label, score))
    finally:
        detector.train(was_training)
    return detections


def detector_validation(val_set, view: str, batch_size: int = 8, num_workers: int = 0):
    """A ``validate(model, device)`` callable for the training loop: COCO mAP on ``view``.

    ``val_set`` is a :class:`~kd_lib.data.detection_shards.DetectionShardDataset`
    (uint8 images paired on the device by its ``pairing``); metrics of sizes
    absent from it are left out.
    """
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_detection)
    ground_truth = val_set.ground_truth()

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        metrics = coco_map(ground_truth, detect(model, loader, val_set.pairing, view, device))
        return {k: v for k, v in metrics.items() if v is not None}

    return validate

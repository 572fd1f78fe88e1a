"""export: a trained model as ONNX for a device, checked in onnxruntime, and its int8 version.

Reads a model folder (``model``: a classifier, or a detector) and the
prepared data it was trained on (``data``). Writes under ``out``:

- ``model.onnx``: torch's ONNX exporter, opset 18, input ``input`` of shape
  ``(batch, 3, side, side)`` with a dynamic batch. A classifier outputs
  ``logits``. A detector outputs its dense head outputs, anchor by anchor
  over the five levels it reads (``cls_logits``, ``bbox_regression``, and
  FCOS's ``bbox_ctrness``): box decoding and NMS, which torchvision's
  RetinaNet and FCOS do in data-dependent Python, stay on the device; its
  image normalization is inside the graph;
- ``model.json``: the preprocessing contract: input side, mean, std, the
  resize mode and ratio that made the LR image from the HR one, class names,
  outputs, and what the model was started from;
- ``model.int8.onnx``: onnxruntime's static quantization (QDQ, int8 weights
  per channel), calibrated on ``calibration_images`` train images;
- ``manifest.json`` last, whose ``info`` holds the numbers below.

The stage checks its own export on the val split: onnxruntime's outputs equal
PyTorch's within ``tolerance x max(1, max |PyTorch output|)`` (max absolute
difference; 1e-3 by default) or the stage fails.
It reports the file sizes, the top-1 agreement of onnxruntime fp32 and int8
with PyTorch and their top-1 accuracy (a classifier), the largest output
difference of int8 (a detector), and the CPU latency at batch 1 of
PyTorch, onnxruntime fp32 and int8 (median of ``latency_repeats``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from components.common import OutputSettings, check_same_classes, finished, preflight, run_key
from components.stage import Stage
from kd_lib.config import check
from kd_lib.data.detection_shards import DetectionShardDataset, collate_detection
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CropTransform
from kd_lib.eval.cost import torch_threads
from kd_lib.export.onnx import OPSET, export_onnx, median_ms, quantize_int8, run_session, session
from kd_lib.io import checkpoint
from kd_lib.io.fs import join, write_bytes, write_text
from kd_lib.io.manifest import read_manifest
from kd_lib.io.publish import Publication
from kd_lib.models.detector_store import DetectorSpec
from kd_lib.models.store import MODEL_FILE, load_classifier

ONNX_FILE, INT8_FILE, CONTRACT_FILE = "model.onnx", "model.int8.onnx", "model.json"


@dataclass
class ExportConfig(OutputSettings):
    model: str = ""
    """the output URI of the stage that trained the model (a classifier or a detector folder)"""
    data: str = ""
    """the prepare-data output URI the model was trained on"""
    out: str = ""
    """where model.onnx, model.int8.onnx and model.json go"""
    tolerance: float = 1e-3
    """the largest difference allowed between onnxruntime's and PyTorch's outputs, relative to the largest
    PyTorch output (at least 1)"""
    calibration_images: int = 256
    """train images that calibrate the int8 activation ranges"""
    batch_size: int = 64
    """images per batch of the val check"""
    latency_repeats: int = 20
    """timed batch-1 runs of each of PyTorch, onnxruntime fp32 and int8 (median)"""

    def validate(self) -> None:
        self.validate_output()
        check(bool(self.model), "model", "is required: the output URI of the stage that trained the model")
        check(bool(self.data), "data", "is required: the prepare-data output URI the model was trained on")
        check(bool(self.out), "out", "is required: where model.onnx and model.json go")
        check(self.tolerance > 0, "tolerance", f"must be > 0, got {self.tolerance}")
        check(self.calibration_images >= 1, "calibration_images", f"must be >= 1, got {self.calibration_images}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.latency_repeats >= 1, "latency_repeats", f"must be >= 1, got {self.latency_repeats}")


class DenseDetector(nn.Module):
    """A torchvision RetinaNet or FCOS up to its dense head outputs: ``[0, 1]`` images in,
    normalized inside, each head output concatenated over the levels out."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.register_buffer("mean", torch.tensor(detector.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(detector.transform.image_std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = list(self.detector.backbone((images - self.mean) / self.std).values())
        outputs = self.detector.head(features)
        return tuple(outputs[name] for name in sorted(outputs))


@dataclass
class Subject:
    """What is exported: the module, its input side, its output names, its val and calibration
    inputs (float batches), and its contract (``model.json``)."""

    module: nn.Module
    side: int
    outputs: list[str]
    val: list[tuple[torch.Tensor, torch.Tensor | None]]  # (inputs, labels or None)
    calibration: list[torch.Tensor]
    contract: dict


def _batches(dataset, config: ExportConfig, view: str, limit: int | None = None, collate=None):
    """Float ``view`` batches of ``dataset`` (and its labels, or None), at most ``limit`` images."""
    indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=config.batch_size,
                                         collate_fn=collate)
    for images, labels in loader:
        hr, lr = dataset.pairing(images)
        yield hr if view == "hr" else lr, labels if isinstance(labels, torch.Tensor) else None


def classifier_subject(config: ExportConfig, data: dict, model: nn.Module, meta: dict) -> Subject:
    info, side = meta["info"], meta["input_size"]
    hr_size, ratio = info.get("hr_size", side), info.get("ratio", 1)
    view = "hr" if side == hr_size else "lr"
    resize = info.get("resize", "bilinear")
    val, train = (ShardedImageDataset(config.data, split, CropTransform(hr_size, ratio, train=False, resize=resize))
                  for split in ("val", "train"))
    contract = {"task": "classification", "input_size": side, "layout": "NCHW", "channels": "RGB",
                "value_range": [0, 1], "mean": info.get("mean", list(IMAGENET_MEAN)),
                "std": info.get("std", list(IMAGENET_STD)),
                "preprocessing": (f"resize the shorter side to {hr_size} px and take the central {hr_size} px "
                                  f"square" + (f", then downsample it {ratio}x ({resize}, antialiased) to {side} px"
                                               if view == "lr" else "") + "; x / 255, then (x - mean) / std"),
                "hr_size": hr_size, "ratio": ratio if view == "lr" else 1, "resize": resize,
                "classes": meta["classes"], "arch": meta["arch"], "outputs": ["logits"]}
    return Subject(model, side, ["logits"], list(_batches(val, config, view)),
                   [x for x, _ in _batches(train, config, view, config.calibration_images)], contract)


def detector_subject(config: ExportConfig, data: dict, state: dict) -> Subject:
    spec = DetectorSpec(**state["spec"])
    detector = spec.build()
    detector.load_state_dict(state["state_dict"])
    ratio = data["image_size"] // spec.image_size
    view = "hr" if ratio == 1 else "lr"
    val, train = (DetectionShardDataset(config.data, split, ratio, resize=state["info"].get("resize", "bilinear"))
                  for split in ("val", "train"))
    outputs = ["bbox_ctrness", "bbox_regression", "cls_logits"] if spec.kind == "fcos" else \
        ["bbox_regression", "cls_logits"]
    contract = {"task": "detection", "input_size": spec.image_size, "layout": "NCHW", "channels": "RGB",
                "value_range": [0, 1], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                "preprocessing": (f"letterbox to {data['image_size']} px" + (
                    f", then downsample {ratio}x (bilinear, antialiased) to {spec.image_size} px" if ratio > 1 else "")
                    + "; x / 255 (the graph normalizes)"),
                "hr_size": data["image_size"], "ratio": ratio, "resize": "bilinear", "classes": state["classes"],
                "arch": f"{spec.kind} {spec.backbone}", "spec": state["spec"], "outputs": outputs,
                "postprocessing": (f"not in the graph: decode the dense outputs on the anchors of levels "
                                   f"P{spec.first_level}-P{spec.first_level + 4} and run NMS "
                                   f"(torchvision {spec.kind})")}
    return Subject(DenseDetector(detector).eval(), spec.image_size, outputs,
                   list(_batches(val, config, view, collate=collate_detection)),
                   [x for x, _ in _batches(train, config, view, config.calibration_images, collate_detection)],
                   contract)


def check_runtime(subject: Subject, fp32: str, int8: str, tolerance: float) -> dict:
    """onnxruntime fp32 and int8 against PyTorch on the val batches (module docstring)."""
    sessions = {"fp32": session(fp32), "int8": session(int8)}
    diff, count, scale = {"fp32": 0.0, "int8": 0.0}, 0, 1.0
    agree, correct = {"fp32": 0, "int8": 0, "torch": 0}, {"fp32": 0, "int8": 0, "torch": 0}
    with torch.inference_mode():
        for inputs, labels in subject.val:
            reference = subject.module(inputs)
            reference = [t.numpy() for t in (reference if isinstance(reference, tuple) else (reference,))]
            top = {"torch": reference[-1].argmax(-1)}
            scale = max(scale, max(float(np.abs(r).max()) for r in reference))
            for name, sess in sessions.items():
                got = run_session(sess, inputs.numpy())
                diff[name] = max(diff[name], max(float(np.abs(g - r).max()) for g, r in zip(got, reference)))
                top[name] = got[-1].argmax(-1)
            for name, t in top.items():
                agree[name] += int((t == top["torch"]).sum())
                if labels is not None:
                    correct[name] += int((t == labels.numpy()).sum())
            count += top["torch"].size
    if diff["fp32"] > tolerance * scale:
        raise RuntimeError(f"export check failed: onnxruntime's outputs differ from PyTorch's by up to "
                           f"{diff['fp32']:.3g} on the val split, above the tolerance {tolerance:g} x "
                           f"{scale:.3g} (the largest PyTorch output)")
    unit = "images" if subject.contract["task"] == "classification" else "anchors"
    result = {"tolerance": tolerance, "max_abs_diff": diff["fp32"], "max_rel_diff": diff["fp32"] / scale,
              "int8_max_abs_diff": diff["int8"],
              "agreement": agree["fp32"] / count, "int8_agreement": agree["int8"] / count, "compared": count,
              "compared_unit": unit}
    if subject.contract["task"] == "classification":
        result.update(top1_torch=correct["torch"] / count, top1=correct["fp32"] / count,
                      int8_top1=correct["int8"] / count)
    return result


def latency(subject: Subject, fp32: str, int8: str, repeats: int) -> dict:
    """Batch-1 CPU latency (ms) of PyTorch, onnxruntime fp32 and int8, each on one thread."""
    x = subject.val[0][0][:1]
    with torch_threads(1), torch.inference_mode():
        result = {"torch_ms": median_ms(lambda: subject.module(x), repeats)}
    for name, path in (("onnx_ms", fp32), ("int8_ms", int8)):
        sess = session(path)
        result[name] = median_ms(lambda: run_session(sess, x.numpy()), repeats)
    return result


def run(config: ExportConfig) -> dict:
    preflight(STAGE.name, config, {"model": config.model, "data": config.data})
    data, source = read_manifest(config.data), read_manifest(config.model)
    key = run_key(STAGE.name, config, {"model": source["fingerprint"], "data": data["data_fingerprint"]},
                  ignored=("model", "latency_repeats"))
    done = finished(STAGE.name, config.out, key)
    if done is not None:
        return done
    state = checkpoint.load_published(config.model, MODEL_FILE)
    check_same_classes("model", config.model, state["classes"], data["classes"],
                       f"export needs the data the model was trained on, not {config.data}")
    if "spec" in state:
        subject = detector_subject(config, data, state)
    else:
        model, meta = load_classifier(config.model)
        subject = classifier_subject(config, data, model, meta)
    subject.contract.update(started_from=state["info"].get("started_from", "random"), source=config.model,
                            opset=OPSET)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, ONNX_FILE), os.path.join(tmp, INT8_FILE)
        export_onnx(subject.module, subject.side, fp32, subject.outputs)
        quantize_int8(fp32, int8, (x.numpy() for x in subject.calibration))
        numbers = {**check_runtime(subject, fp32, int8, config.tolerance),
                   **latency(subject, fp32, int8, config.latency_repeats),
                   "onnx_bytes": os.path.getsize(fp32), "int8_bytes": os.path.getsize(int8),
                   "calibration_images": sum(len(x) for x in subject.calibration)}
        with Publication(config.out, STAGE.name, key) as publication:
            for name, path in ((ONNX_FILE, fp32), (INT8_FILE, int8)):
                with open(path, "rb") as f:
                    write_bytes(join(publication.folder, name), f.read())
            write_text(join(publication.folder, CONTRACT_FILE), json.dumps(subject.contract, indent=2))
            print(f"export: {ONNX_FILE} {numbers['onnx_bytes'] / 1e6:.2f} MB, agreement "
                  f"{100 * numbers['agreement']:.1f}%, max |diff| {numbers['max_abs_diff']:.2g}; {INT8_FILE} "
                  f"{numbers['int8_bytes'] / 1e6:.2f} MB, agreement {100 * numbers['int8_agreement']:.1f}%",
                  file=sys.stderr)
            return publication.commit([ONNX_FILE, INT8_FILE, CONTRACT_FILE], {
                "config": asdict(config), "inputs": {"model": config.model, "data": config.data},
                "final": numbers, "started_from": subject.contract["started_from"]})


STAGE = Stage("export", ExportConfig, run)

if __name__ == "__main__":
    sys.exit(STAGE.main())

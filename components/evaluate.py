"""evaluate: every model on the validation split at its own input size.

For each model: its accuracy, parameters, GFLOPs and latency (median of
repeated forwards at each of ``latency_batch_sizes`` on the current device)
at its input size, and the input bytes per image (``3 * side^2``, 8-bit). LR
models see the HR validation image downsampled by the ratio, exactly as in
training. The accuracy follows the data:

- classification: top-1/top-5 on the HR crop or its LR version;
- detection: COCO mAP (AP, AP50, AP75, APs/m/l) against the HR ground truth,
  an LR detector's boxes scaled back by its ratio (read from its input side).

Each classifier's entry also says how it was trained, from its manifest: its
``stage``, ``method``, the evaluated model it was ``distilled_from`` (if
any), its ``settings`` that differ from the stage's defaults, and its
``history`` (the training loop's metrics rows: losses per term, lr, val
top-1). The summary then gets the verdicts of :mod:`kd_lib.eval.verdicts`
(each model against the LR baseline and its teacher) and, in the pipeline,
the teacher ``gate``'s decision. Only the models given are evaluated: a run
whose gate skipped the students evaluates the teacher and the LR baseline.

Publishes under ``out`` (:class:`~kd_lib.io.publish.Publication`: a failed
run leaves the previous summary in place): ``summary.json``,
``metrics.parquet`` (one row per model), ``report.html`` (tables, verdicts,
training curves and a plot of top-1 against GFLOPs), ``report.png`` (that
plot alone), and ``manifest.json`` last, whose ``paths`` say where each file
is. ``exports`` (model name -> export stage output) adds each exported model's
ONNX and int8 numbers to its row.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from components.common import OutputSettings, load_upstream, preflight, run_key
from components.detection_common import load_upstream_detector, read_rows
from components.stage import Stage
from kd_lib.config import ConfigError, check
from kd_lib.data.detection_shards import DetectionShardDataset, collate_detection
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform, PairedResize
from kd_lib.engine.loop import resolve_device, write_metrics
from kd_lib.eval.accuracy import evaluate_classifier
from kd_lib.eval.cost import count_gflops, count_params, input_bytes, latency_profile
from kd_lib.eval.detection import coco_map, detect
from kd_lib.eval.report import PLOT_FILE, REPORT_FILE, format_table, write_report
from kd_lib.eval.verdicts import verdict_lines, with_verdicts
from kd_lib.io.fs import join, write_text
from kd_lib.io.manifest import published_uri, read_manifest
from kd_lib.io.publish import Publication
from kd_lib.ops import ResizeMode

SUMMARY_FILE, METRICS_FILE = "summary.json", "metrics.parquet"


@dataclass
class EvaluateConfig(OutputSettings):
    data: str = ""
    """the prepare-data output URI"""
    out: str = ""
    """where the summary and report go"""
    models: dict[str, str] = field(default_factory=dict)
    """name=URI of each model to evaluate"""
    exports: dict[str, str] = field(default_factory=dict)
    """name=URI of the export stage output of an evaluated model: its ONNX and int8 numbers join its row"""
    hr_size: int = 64
    """classification: the side of the HR validation crop, in px"""
    ratio: int = 4
    """classification: the LR image is the HR one downsampled by this factor"""
    resize: ResizeMode = "bilinear"
    """how the LR image is made from the HR one"""
    batch_size: int = 256
    """images per validation batch"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (the GPU if there is one); latency is measured on it"""
    num_workers: int = 1
    """DataLoader worker processes"""
    latency_repeats: int = 10
    """forwards timed per batch size (the median is reported)"""
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    """batch sizes whose latency is measured"""
    gate: dict = field(default_factory=dict)
    """the pipeline's teacher gate (kd_lib.eval.verdicts.teacher_gate)"""
    code_version: str = ""
    """the code that trained the models: an image tag or a hash of the sources"""

    def validate(self) -> None:
        self.validate_output()
        check(bool(self.data), "data", "is required: the prepare-data output URI")
        check(bool(self.out), "out", "is required: where the summary and report go")
        check(bool(self.models), "models", "is required: name=URI of each model to evaluate")
        check(set(self.exports) <= set(self.models), "exports",
              f"names models that are not evaluated: {sorted(set(self.exports) - set(self.models))}")
        check(self.hr_size % self.ratio == 0, "hr_size", f"{self.hr_size} is not divisible by ratio {self.ratio}")
        check(self.latency_repeats >= 1, "latency_repeats", f"must be >= 1, got {self.latency_repeats}")
        check(bool(self.latency_batch_sizes) and all(b >= 1 for b in self.latency_batch_sizes),
              "latency_batch_sizes", f"must be batch sizes >= 1, got {self.latency_batch_sizes}")


def model_view(name: str, input_size: int, config: EvaluateConfig) -> str:
    """``hr`` or ``lr``: which of the paired validation images the model takes."""
    sizes = {config.hr_size // config.ratio: "lr", config.hr_size: "hr"}  # ratio 1: every model is HR
    if input_size not in sizes:
        raise ConfigError("models", f"{name} was trained at {input_size} px, but this evaluation has "
                          f"HR {config.hr_size} px and LR {config.hr_size // config.ratio} px")
    return sizes[input_size]


def device_name(device: torch.device) -> str:
    """The device latency is measured on, named: ``cuda:0 (NVIDIA H200)``, ``cpu (AMD EPYC, 2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{device} ({model + ', ' if model else ''}{torch.get_num_threads()} threads)"


def deployment_cost(model: torch.nn.Module, size: int, config: EvaluateConfig, device: torch.device) -> dict:
    """Parameters, GFLOPs, input bytes and latency of ``model`` (already on ``device``) at ``size``."""
    return {"params": count_params(model), "gflops": count_gflops(model, size), "input_bytes": input_bytes(size),
            "latency_ms": latency_profile(model, size, device, config.latency_batch_sizes,
                                          repeats=config.latency_repeats)}


#: Config fields that wire a stage or say where it runs, not how it trains.
WIRING = ("data", "out", "checkpoint_root", "teacher", "assistant", "device", "num_workers", "checkpoint_every",
          "arch", "hr_size", "ratio")


def training_record(uri: str, names: dict[str, str]) -> dict:
    """How the model at ``uri`` was trained, from its manifest: ``stage``, ``method`` (``ce``
    without a teacher, ``kd`` for a stage distilling with no method field), ``distilled_from``
    (the name, in ``names`` (URI -> name), of the model it learned from), the ``settings`` that
    differ from the stage's defaults, and its per-epoch ``history`` rows."""
    from components.stage import stages  # imports this module

    manifest = read_manifest(uri)
    config, stage = manifest.get("config", {}), manifest["stage"]
    upstream = [u for field, u in manifest.get("inputs", {}).items() if field != "data"]
    declared = stages().get(stage)
    defaults = asdict(declared.config()) if declared else {}
    history = read_rows(uri) if METRICS_FILE in manifest.get("files", {}) else []
    return {"stage": stage, "method": config.get("method", "kd" if upstream else "ce"),
            "distilled_from": next((names[u] for u in upstream if u in names), None),
            "settings": {k: v for k, v in config.items() if k not in WIRING and (k not in defaults or defaults[k] != v)},
            "history": history}


def evaluate_model(name: str, uri: str, classes: list[str], loader, pairing: PairedResize,
                   config: EvaluateConfig, device: torch.device) -> dict:
    """Accuracy and deployment cost of the classifier at ``uri``; ``loader`` yields batches of
    uint8 validation crops and labels, which ``pairing`` makes into the HR and LR batches on
    ``device``."""
    model, meta, fingerprint = load_upstream(uri, name, classes)
    size = meta["input_size"]
    view = model_view(name, size, config)
    model.to(device)
    accuracy = evaluate_classifier(model, loader, pairing, view, device)
    return {"name": name, "arch": meta["arch"], "input_size": size, "view": view,
            "top1": accuracy["top1"], "top5": accuracy["top5"], **deployment_cost(model, size, config, device),
            "started_from": meta["info"].get("started_from", "random"),
            "uri": uri, "fingerprint": fingerprint,
            **training_record(uri, {u: n for n, u in config.models.items()})}


def evaluate_detector(name: str, uri: str, classes: list[str], image_size: int, config: EvaluateConfig,
                      device: torch.device) -> dict:
    model, spec, fingerprint, meta = load_upstream_detector(uri, name, classes)
    size = spec.image_size
    if image_size % size:
        raise ConfigError("models", f"{name} reads {size} px images, which is not the data's {image_size} px "
                          "divided by a whole ratio")
    ratio = image_size // size
    val_set = DetectionShardDataset(config.data, "val", ratio, resize=config.resize)
    loader = torch.utils.data.DataLoader(val_set, batch_size=8, num_workers=config.num_workers,
                                         collate_fn=collate_detection)
    view = "hr" if ratio == 1 else "lr"
    model.to(device)
    metrics = coco_map(val_set.ground_truth(), detect(model, loader, val_set.pairing, view, device))
    return {"name": name, "arch": f"{spec.kind} {spec.backbone}", "input_size": size, "view": view,
            "ratio": ratio, **metrics, **deployment_cost(model, size, config, device),
            "started_from": meta["info"].get("started_from", "random"), "uri": uri,
            "fingerprint": fingerprint}


def run(config: EvaluateConfig) -> dict:
    preflight(STAGE.name, config, {"data": config.data, **config.models,
                                   **{f"{name} export": uri for name, uri in config.exports.items()}})
    data = read_manifest(config.data)
    classes = data["classes"]
    device = resolve_device(config.device)
    task = data.get("task", "classification")
    if task == "detection":  # each model has its own ratio, given by its input side
        hr_size = data["image_size"]
        models = [evaluate_detector(name, uri, classes, hr_size, config, device)
                  for name, uri in config.models.items()]
        ratio = ", ".join(str(r) for r in sorted({m["ratio"] for m in models} - {1}))
    else:
        hr_size, ratio = config.hr_size, config.ratio
        val_set = ShardedImageDataset(config.data, "val", CropTransform(
            config.hr_size, config.ratio, train=False, resize=config.resize))
        loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers)
        models = [evaluate_model(name, uri, classes, loader, val_set.pairing, config, device)
                  for name, uri in config.models.items()]
    exports = {name: read_manifest(uri) for name, uri in config.exports.items()}
    for model in models:
        if model["name"] in exports:
            model["export"] = {**exports[model["name"]]["final"], "uri": config.exports[model["name"]]}
    summary = {"task": task,
               "dataset": {"uri": data["source"], "fingerprint": data["data_fingerprint"],
                           "num_classes": data["num_classes"],
                           "train_images": data["splits"]["train"]["images"],
                           "val_images": data["splits"]["val"]["images"]},
               "hr_size": hr_size, "ratio": ratio, "device": device_name(device),
               "code_version": config.code_version, "models": models}
    if config.gate:
        summary["gate"] = config.gate
    summary = with_verdicts(summary)
    inputs = {"data": data["data_fingerprint"]} | {m["name"]: m["fingerprint"] for m in models} | {
        f"{n} export": e["fingerprint"] for n, e in exports.items()}
    with Publication(config.out, STAGE.name, run_key(STAGE.name, config, inputs)) as publication:
        write_text(join(publication.folder, SUMMARY_FILE), json.dumps(summary, indent=2))
        write_metrics([{k: v for k, v in m.items() if k not in ("latency_ms", "settings", "history")} |
                       {f"latency_ms_{k}": v for k, v in m["latency_ms"].items()} for m in models],
                      join(publication.folder, METRICS_FILE))
        write_report(summary, publication.folder)
        manifest = publication.commit([SUMMARY_FILE, METRICS_FILE, REPORT_FILE, PLOT_FILE], {"config": asdict(config)})
    print("\n".join([format_table(summary), *verdict_lines(summary)]))
    print(f"summary: {published_uri(config.out, SUMMARY_FILE, manifest)}\n"
          f"report:  {published_uri(config.out, REPORT_FILE, manifest)}")
    return summary


STAGE = Stage("evaluate", EvaluateConfig, run, output="summary")

if __name__ == "__main__":
    sys.exit(STAGE.main())

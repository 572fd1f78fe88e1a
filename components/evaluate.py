"""evaluate: every model on the validation split at its own input size.

For each model: top-1/top-5, parameters, GFLOPs and latency (median of
repeated batch-1 and batch-64 forwards on the current device) at its input
size, and the input bytes per image (``3 * side^2``, 8-bit). LR models see the
HR validation crop downsampled by the ratio, exactly as in training.

Writes under ``out``: ``summary.json``, ``metrics.parquet`` (one row per
model), ``report.html`` (table and a plot of top-1 against GFLOPs), and
``manifest.json`` last.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from components.common import load_upstream, stage_cli
from kd_lib.config import ConfigError, check
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import PairedTransform, ResizeMode
from kd_lib.engine.loop import resolve_device, write_metrics
from kd_lib.eval.accuracy import evaluate_classifier
from kd_lib.eval.cost import count_gflops, count_params, input_bytes, latency_profile
from kd_lib.eval.report import format_table, write_report
from kd_lib.io.fs import join, write_text
from kd_lib.io.manifest import read_manifest, stage_key, unpublish, write_manifest

SUMMARY_FILE, REPORT_FILE, METRICS_FILE = "summary.json", "report.html", "metrics.parquet"


@dataclass
class EvaluateConfig:
    data: str = ""
    out: str = ""
    models: dict[str, str] = field(default_factory=dict)
    hr_size: int = 64
    ratio: int = 4
    resize: ResizeMode = "bilinear"
    batch_size: int = 256
    device: str = "auto"
    num_workers: int = 1
    latency_repeats: int = 10

    def validate(self) -> None:
        check(bool(self.data), "data", "is required: the prepare-data output URI")
        check(bool(self.out), "out", "is required: where the summary and report go")
        check(bool(self.models), "models", "is required: name=URI of each model to evaluate")
        check(self.hr_size % self.ratio == 0, "hr_size", f"{self.hr_size} is not divisible by ratio {self.ratio}")
        check(self.latency_repeats >= 1, "latency_repeats", f"must be >= 1, got {self.latency_repeats}")


def model_view(name: str, input_size: int, config: EvaluateConfig) -> str:
    """``hr`` or ``lr``: which of the paired validation images the model takes."""
    sizes = {config.hr_size: "hr", config.hr_size // config.ratio: "lr"}
    if input_size not in sizes:
        raise ConfigError("models", f"{name} was trained at {input_size} px, but this evaluation has "
                          f"HR {config.hr_size} px and LR {config.hr_size // config.ratio} px")
    return sizes[input_size]


def evaluate_model(name: str, uri: str, classes: list[str], loader, config: EvaluateConfig,
                   device: torch.device) -> dict:
    model, meta, fingerprint = load_upstream(uri, name, classes)
    size = meta["input_size"]
    view = model_view(name, size, config)
    model.to(device)
    accuracy = evaluate_classifier(model, loader, view, device)
    return {"name": name, "arch": meta["arch"], "input_size": size, "view": view,
            "top1": accuracy["top1"], "top5": accuracy["top5"], "params": count_params(model),
            "gflops": count_gflops(model, size), "input_bytes": input_bytes(size),
            "latency_ms": latency_profile(model, size, device, repeats=config.latency_repeats),
            "uri": uri, "fingerprint": fingerprint}


def run(config: EvaluateConfig) -> dict:
    data = read_manifest(config.data)
    classes = data["classes"]
    device = resolve_device(config.device)
    val_set = ShardedImageDataset(config.data, "val", PairedTransform(
        config.hr_size, config.ratio, train=False, resize=config.resize))
    loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, num_workers=config.num_workers)
    models = [evaluate_model(name, uri, classes, loader, config, device) for name, uri in config.models.items()]
    summary = {"dataset": {"uri": data["source"], "fingerprint": data["data_fingerprint"],
                           "num_classes": data["num_classes"],
                           "train_images": data["splits"]["train"]["images"],
                           "val_images": data["splits"]["val"]["images"]},
               "hr_size": config.hr_size, "ratio": config.ratio, "device": str(device), "models": models}
    unpublish(config.out)
    write_text(join(config.out, SUMMARY_FILE), json.dumps(summary, indent=2))
    write_metrics([{k: v for k, v in m.items() if k != "latency_ms"} |
                   {f"latency_ms_{k}": v for k, v in m["latency_ms"].items()} for m in models],
                  join(config.out, METRICS_FILE))
    write_report(summary, config.out)
    inputs = {m["name"]: m["fingerprint"] for m in models}
    write_manifest(config.out, stage="evaluate", key=stage_key("evaluate", asdict(config), inputs),
                   files=[SUMMARY_FILE, METRICS_FILE, REPORT_FILE], info={"config": asdict(config)})
    print(format_table(summary))
    print(f"summary: {join(config.out, SUMMARY_FILE)}\nreport:  {join(config.out, REPORT_FILE)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_cli(EvaluateConfig, run, argv, "kdp stage evaluate", __doc__)


if __name__ == "__main__":
    sys.exit(main())

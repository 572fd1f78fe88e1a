"""sweep: which input size and which model keep enough of the HR accuracy, at the least cost.

Reads the evaluations of a sweep (:mod:`pipelines.sweep`): ``evaluations`` maps ``hr`` to
the evaluation of the HR models (the teacher, and each architecture's assistant, named
``ARCH@1``) and each cell ``ARCH@RATIO`` to the evaluation of its distilled LR ``student``
and its ``lr_baseline``. Each cell (:class:`kd_lib.eval.sweep.Cell`) is then its model's
top-1, input bytes, GFLOPs and batch-1 latency; ratio 1 is the assistant itself. The
reference is the best HR model's top-1.

The answer (:mod:`kd_lib.eval.sweep`): the Pareto front of top-1 against each cost,
cells within noise of it marked and not ranked, and the cell chosen for the budget:
``keep`` (the fraction of the reference to keep, 0: none), ``max_bytes``,
``max_gflops``, ``max_latency_ms`` (0: no limit), the cheapest by ``cost``. When no
cell meets the budget, the summary says so and names the closest cell; nothing is
chosen. The chosen cell's model is exported by the export stage into ``export/``
under ``out``.

Publishes ``summary.json`` (the cells, the budget, the choice, the export),
``report.html``, ``report.png`` (the fronts) and ``camera.png`` (what the camera
would send: ``camera_images`` validation images at each input size, with each cell's
prediction), and ``manifest.json`` last.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from components.common import OutputSettings, load_upstream, preflight, run_key
from components.stage import Stage
from kd_lib.config import ConfigError, check, from_dict
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform, PairedResize
from kd_lib.eval.sweep import Budget, Cell, choose, format_table, sweep_summary
from kd_lib.eval.sweep_report import front_figure, inputs_figure, sweep_html
from kd_lib.eval.verdicts import standard_error
from kd_lib.io.fs import join, write_text
from kd_lib.io.manifest import read_manifest, read_published
from kd_lib.io.publish import Publication

SUMMARY_FILE, REPORT_FILE, FRONT_FILE, CAMERA_FILE = "summary.json", "report.html", "report.png", "camera.png"
#: The evaluation of the HR models, among ``evaluations``.
HR = "hr"


@dataclass
class SweepConfig(OutputSettings):
    data: str = ""
    """the prepare-data output URI"""
    out: str = ""
    """where the summary, the report and the chosen model's export go"""
    evaluations: dict[str, str] = field(default_factory=dict)
    """hr: the evaluation of the HR models; ARCH@RATIO: each cell's evaluation (URIs of evaluate outputs)"""
    keep: float = 0.9
    """choose the cheapest cell whose top-1 keeps this fraction of the best HR model's (0: the most accurate)"""
    max_bytes: float = 0.0
    """the largest input an image may take, in bytes (0: no limit)"""
    max_gflops: float = 0.0
    """the most GFLOPs a forward may take (0: no limit)"""
    max_latency_ms: float = 0.0
    """the longest batch-1 latency, in ms, as evaluate measured it (0: no limit)"""
    cost: Literal["input_bytes", "gflops", "latency_ms"] = "input_bytes"
    """what cheapest means"""
    camera_images: int = 4
    """validation images shown at each input size in camera.png"""
    export: bool = True
    """export the chosen cell's model"""

    def validate(self) -> None:
        self.validate_output()
        check(bool(self.data), "data", "is required: the prepare-data output URI")
        check(bool(self.out), "out", "is required: where the summary goes")
        check(HR in self.evaluations, "evaluations", f"needs {HR}: the evaluation of the HR models")
        check(self.camera_images >= 1, "camera_images", f"must be >= 1, got {self.camera_images}")
        try:
            self.budget.validate()
        except ConfigError as err:  # named by its flag (--max-bytes); here the field is max_bytes
            raise ConfigError(err.field.lstrip("-").replace("-", "_"), err.message) from None

    @property
    def budget(self) -> Budget:
        """The budget, 0 meaning none."""
        return Budget(self.keep or None, self.max_bytes or None, self.max_gflops or None, self.max_latency_ms or None,
                      self.cost)


def cell(arch: str, ratio: int, model: dict, baseline: dict | None, val_images: int) -> Cell:
    """A cell from the evaluation rows of its model and of its LR baseline."""
    return Cell(arch, ratio, model["input_size"], (model["top1"],), (baseline["top1"],) if baseline else (),
                val_images, model["input_bytes"], model["gflops"], model["latency_ms"]["batch_1"])


def read_cells(evaluations: dict[str, str]) -> tuple[list[Cell], dict[str, str], dict, dict]:
    """The cells, each cell's model URI, the HR evaluation's summary and its best model row."""
    summaries = {name: json.loads(read_published(uri, SUMMARY_FILE)) for name, uri in evaluations.items()}
    hr = summaries.pop(HR)
    n = hr["dataset"]["val_images"]
    cells, uris = [], {}
    for model in hr["models"]:
        arch, at, ratio = model["name"].rpartition("@")
        if at:
            cells.append(cell(arch, int(ratio), model, None, n))
            uris[cells[-1].key] = model["uri"]
    for name, summary in summaries.items():
        arch, _, ratio = name.rpartition("@")
        rows = {m["name"]: m for m in summary["models"]}
        if {"student", "lr_baseline"} - set(rows):
            raise ConfigError("evaluations", f"{name}: {evaluations[name]} does not hold a student and an lr_baseline")
        cells.append(cell(arch, int(ratio), rows["student"], rows["lr_baseline"], n))
        uris[cells[-1].key] = rows["student"]["uri"]
    best = max(hr["models"], key=lambda m: m["top1"])
    return sorted(cells, key=lambda c: (c.arch, c.ratio)), uris, hr, best


def camera(config: SweepConfig, cells: list[Cell], uris: dict[str, str], classes: list[str], hr_size: int
           ) -> tuple[list[torch.Tensor], list[int], dict[str, list[int]]]:
    """The first ``camera_images`` validation crops at HR, their labels, and each cell's predictions
    on them at its input size (the evaluation's crop and resize)."""
    val = ShardedImageDataset(config.data, "val", CropTransform(hr_size, 1, train=False))
    items = [val[i] for i in range(min(config.camera_images, len(val)))]
    images = torch.stack([image for image, _ in items])
    predictions = {}
    for c in cells:
        model, _, _ = load_upstream(uris[c.key], c.key, classes)
        hr, lr = PairedResize(c.ratio)(images)
        with torch.inference_mode():
            predictions[c.key] = model.eval()(lr if c.ratio > 1 else hr).argmax(1).tolist()
    return list(images), [label for _, label in items], predictions


def export_choice(config: SweepConfig, uri: str) -> dict:
    """Export the chosen model with the export stage, into ``export/`` under ``out``."""
    from components import export

    target = join(config.out, "export")
    manifest = export.run(from_dict(export.ExportConfig, {"model": uri, "data": config.data, "out": target,
                                                          "storage_timeout": config.storage_timeout}))
    return {**manifest["final"], "uri": target, "model": uri}


def run(config: SweepConfig) -> dict:
    preflight(STAGE.name, config, {"data": config.data, **config.evaluations})
    data = read_manifest(config.data)
    classes = data["classes"]
    cells, uris, hr, best = read_cells(config.evaluations)
    reference_se = standard_error(best["top1"], hr["dataset"]["val_images"])
    choice = choose(cells, best["top1"], reference_se, config.budget)
    summary = {"task": "sweep", "dataset": hr["dataset"], "data": config.data, "hr_size": hr["hr_size"],
               "device": hr["device"], "reference": best["name"], "model_uris": uris,
               **sweep_summary(cells, best["top1"], reference_se, config.budget, choice)}
    if config.export and choice.cell is not None:
        summary["export"] = export_choice(config, uris[choice.cell.key])
    images, labels, predictions = camera(config, cells, uris, classes, hr["hr_size"])
    sizes = sorted({c.input_size for c in cells}, reverse=True)
    inputs = {"data": data["data_fingerprint"]} | {
        name: read_manifest(uri)["fingerprint"] for name, uri in config.evaluations.items()}
    with Publication(config.out, STAGE.name, run_key(STAGE.name, config, inputs)) as publication:
        front = front_figure(cells, choice, join(publication.folder, FRONT_FILE))
        shown = inputs_figure(images, sizes, predictions, classes, labels, join(publication.folder, CAMERA_FILE))
        write_text(join(publication.folder, SUMMARY_FILE), json.dumps(summary, indent=2))
        write_text(join(publication.folder, REPORT_FILE), sweep_html(summary, front, shown))
        publication.commit([SUMMARY_FILE, REPORT_FILE, FRONT_FILE, CAMERA_FILE], {"config": asdict(config)})
    print(format_table(cells, best["top1"], choice))
    return summary


STAGE = Stage("sweep", SweepConfig, run, output="summary")

if __name__ == "__main__":
    sys.exit(STAGE.main())

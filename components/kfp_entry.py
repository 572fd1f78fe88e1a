"""The bodies of the KFP components: turn KFP inputs into a stage config and run it.

KFP serializes a lightweight component's function source, so those functions
stay three lines long and call :func:`run_stage` here, in the image. The
stage's output URI is the output artifact's URI (a local path under the
pipeline root, or ``gs://...`` on a cluster), read and written through fsspec.
"""

from __future__ import annotations

import json

from components import afp, assistant, detector, evaluate, lr_baseline, prepare_data, student, teacher
from kd_lib.config import from_dict

STAGES = {
    "prepare-data": (prepare_data.PrepareDataConfig, prepare_data.run),
    "teacher": (teacher.TeacherConfig, teacher.run),
    "assistant": (assistant.AssistantConfig, assistant.run),
    "student": (student.StudentConfig, student.run),
    "lr-baseline": (lr_baseline.LRBaselineConfig, lr_baseline.run),
    "detector": (detector.DetectorConfig, detector.run),
    "afp": (afp.AFPConfig, afp.run),
    "evaluate": (evaluate.EvaluateConfig, evaluate.run),
}


def stage_config(stage: str, overrides: dict, **fields):
    """The typed config of ``stage``: ``overrides`` (user settings) plus ``fields``
    (the pipeline's wiring). A field set both ways is an error, as is any
    unknown or bad field."""
    config_cls, _ = STAGES[stage]
    clash = sorted(set(overrides) & set(fields))
    if clash:
        raise ValueError(f"{stage}: {clash} are set by the pipeline; remove them from the {stage} settings")
    return from_dict(config_cls, {**overrides, **fields}, where=f"{stage} settings")


def final_metrics(result: dict) -> dict[str, float]:
    """The numbers a stage reports to KFP: a training stage's last metrics row,
    or the top-1/top-5 (classification) or AP/AP50 (detection) of each evaluated model."""
    if "models" in result:
        keys = ("AP", "AP50") if result.get("task") == "detection" else ("top1", "top5")
        return {f"{m['name']}_{k}": m[k] for m in result["models"] for k in keys}
    return {k: v for k, v in result.get("final", {}).items() if isinstance(v, (int, float))}


def run_stage(stage: str, overrides: dict, metrics=None, **fields) -> dict:
    """Run ``stage``; log its final numbers on the KFP ``metrics`` artifact, if given.

    A file is always written at the metrics artifact's path: KFP's local cache
    treats a task whose output file is missing as a miss.
    """
    _, run = STAGES[stage]
    result = run(stage_config(stage, overrides, **fields))
    if metrics is not None:
        numbers = final_metrics(result)
        for name, value in numbers.items():
            metrics.log_metric(name, value)
        with open(metrics.path, "w") as f:
            json.dump(numbers, f)
    return result

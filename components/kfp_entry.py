"""The bodies of the KFP components: turn KFP inputs into a stage config and run it.

KFP serializes a lightweight component's function source, so those functions
stay three lines long and call :func:`run_stage` here, in the image. The
stage's output URI is the output artifact's URI (a local path under the
pipeline root, or ``gs://...`` on a cluster), read and written through fsspec.

A training task either runs its stage in its own process (``launcher``
``{"kind": "pod"}``) or starts it as a TorchX job with the stage's
``kdp stage`` flags and waits for it (``{"kind": "torchx", ...}``: see
:class:`Launcher`); the job publishes its manifest under the same output URI.
"""

from __future__ import annotations

import contextlib
import json
import os
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Literal

from components.pod import PodSettings
from components.stage import find
from kd_lib.config import ConfigError, check, from_dict, to_flags
from kd_lib.errors import exit_on_failure
from kd_lib.io.fs import join
from kd_lib.io.lease import TASK_ENV
from kd_lib.io.manifest import read_manifest

#: The detection pipeline's evaluated models: name -> (task, subfolder of the task's output).
DETECTION_MODELS = {"teacher": ("teacher", ""), "assistant": ("afp", "assistant"),
                    "student_afp": ("afp", "student"), "msad_teacher": ("msad", "assistant"),
                    "student_msad": ("msad", "student"), "lr_baseline": ("lr_baseline", "")}


def detection_models(**outputs: str) -> dict[str, str]:
    """The URI of each evaluated detector, from the output URIs of the detection tasks.

    Here, not in :mod:`pipelines.detection`: a component runs with KFP's
    runtime ``kfp.dsl``, which lacks what the pipeline modules import.
    """
    return {name: join(outputs[task], folder) if folder else outputs[task]
            for name, (task, folder) in DETECTION_MODELS.items()}


def stage_config(stage: str, overrides: dict, **fields):
    """The typed config of ``stage``: ``overrides`` (user settings) plus ``fields``
    (the pipeline's wiring). A field set both ways is an error, as is any
    unknown or bad field."""
    clash = sorted(set(overrides) & set(fields))
    if clash:
        raise ConfigError(clash[0], f"is set by the pipeline; remove it from the {stage} settings",
                          f"{stage} settings")
    return from_dict(find(stage).config, {**overrides, **fields}, where=f"{stage} settings")


def tuned(settings: dict, epochs: int = 0, lr: float = 0.0) -> dict:
    """A training task's ``settings`` with the pipeline's typed ``epochs`` and ``lr`` parameters
    over them, those that are set (> 0)."""
    return {**settings, **{name: value for name, value in (("epochs", epochs), ("lr", lr)) if value}}


def final_metrics(result: dict) -> dict[str, float]:
    """The numbers a stage reports to KFP: a training stage's last metrics row,
    or the top-1/top-5 (classification) or AP/AP50 (detection) of each evaluated model."""
    if "models" in result:
        keys = ("AP", "AP50") if result.get("task") == "detection" else ("top1", "top5")
        return {f"{m['name']}_{k}": m[k] for m in result["models"] for k in keys}
    return {k: v for k, v in result.get("final", {}).items() if isinstance(v, (int, float))}


@dataclass
class Launcher(PodSettings):
    """Where a training stage runs: ``pod`` (in this process) or ``torchx`` (a TorchX job of
    ``nnodes`` x ``nproc_per_node`` processes of ``image`` on ``scheduler``, run config ``cfg``,
    its pods with the pod settings of the task)."""

    kind: Literal["pod", "torchx"] = "pod"
    scheduler: str = "kubernetes"
    nnodes: int = 1
    nproc_per_node: int = 1
    image: str = ""
    cfg: str = ""

    def validate(self) -> None:
        super().validate()
        check(self.kind == "pod" or bool(self.image), "image", "is required with kind torchx: the job's image")
        check(self.nnodes >= 1, "nnodes", f"must be >= 1, got {self.nnodes}")
        check(self.nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")


def launch_with_torchx(stage: str, config, launcher: Launcher) -> dict:
    """Run ``stage`` as a TorchX job and wait for it; its result is the manifest it published."""
    from components.torchx_apps import launch_and_wait

    pod = PodSettings(**{spec.name: getattr(launcher, spec.name) for spec in fields(PodSettings)})
    launch_and_wait(stage, to_flags(config), scheduler=launcher.scheduler, nnodes=launcher.nnodes,
                    nproc_per_node=launcher.nproc_per_node, image=launcher.image, cfg=launcher.cfg, pod=pod)
    return read_manifest(config.out)


class Planned(Exception):
    """What :func:`run_stage` raises while :func:`planning`: the stage a task runs and its config."""

    def __init__(self, stage: str, config):
        super().__init__(stage)
        self.stage, self.config = stage, config


_planning: ContextVar[bool] = ContextVar("planning", default=False)


@contextlib.contextmanager
def planning():
    """Within it, :func:`run_stage` builds and checks the config and the launcher of its stage,
    then raises :class:`Planned` instead of running it (see :mod:`pipelines.tasks`)."""
    token = _planning.set(True)
    try:
        yield
    finally:
        _planning.reset(token)


def run_stage(stage: str, overrides: dict, metrics=None, launcher: dict | None = None, **fields) -> dict:
    """Run ``stage`` where ``launcher`` says (:class:`Launcher`; None: in this process); log its
    final numbers on the KFP ``metrics`` artifact, if given.

    A file is always written at the metrics artifact's path: KFP's local cache
    treats a task whose output file is missing as a miss. A user's failure
    ends the task with its message and exit status (:mod:`kd_lib.errors`).
    """
    def configured():
        return stage_config(stage, overrides, **fields), from_dict(Launcher, launcher or {}, where="launcher")

    if _planning.get():
        raise Planned(stage, configured()[0])

    def body() -> dict:
        from components.common import stage_run

        config, launch = configured()
        if launch.kind == "torchx":
            return launch_with_torchx(stage, config, launch)
        os.environ[TASK_ENV] = "kfp"  # the output is this task's own: a retry takes over its lease
        with stage_run():
            return find(stage).run(config)

    result = exit_on_failure(f"kdp stage {stage}", body)
    if metrics is not None:
        numbers = final_metrics(result)
        for name, value in numbers.items():
            metrics.log_metric(name, value)
        with open(metrics.path, "w") as f:
            json.dump(numbers, f)
    return result

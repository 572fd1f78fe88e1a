"""The bodies of the KFP components: turn KFP inputs into a stage config and run it.

A pipeline's components are written from its DAG table (:mod:`pipelines.dag`): each is
three lines that hand its arguments and its wiring to :func:`run_task` here, in the image
(KFP runs a lightweight component from its source text). The stage's output URI is the
output artifact's URI (a local path under the pipeline root, or ``gs://...`` on a
cluster), read and written through fsspec. This module imports nothing of
:mod:`pipelines`: a component runs with KFP's runtime ``kfp.dsl``, which lacks what the
pipeline modules import.

A training task either runs its stage in its own process (``launcher``
``{"kind": "pod"}``) or starts it as a TorchX job with the stage's
``kdp stage`` flags and waits for it (``{"kind": "torchx", ...}``: see
:class:`Launcher`); the job publishes its manifest under the same output URI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Literal

from components.pod import PodSettings
from components.stage import find
from kd_lib.config import ConfigError, check, from_dict, to_flags
from kd_lib.errors import exit_on_failure
from kd_lib.io.fs import join
from kd_lib.io.lease import TASK_ENV
from kd_lib.io.manifest import read_manifest, read_published


def is_set(value) -> bool:
    """Whether a typed pipeline parameter's value sets its field: anything but 0 and ''."""
    return isinstance(value, bool) or value not in ("", 0)


def task_config(wiring: dict, inputs: dict):
    """The checked config of the stage a task runs, from the task's ``inputs`` (its component's
    arguments) as its ``wiring`` (:func:`pipelines.dag.Pipeline.wiring`) says:

    - ``reads``: field -> [argument, folder]: the URI of an upstream task's output artifact (its
      ``folder`` in it, if given); a field ``models.NAME`` is the key NAME of the field ``models``;
    - ``fixed``: fields the DAG sets to constants; the output artifact's URI is ``out``;
    - ``params``: fields fed by typed pipeline parameters of the same name as the argument;
      a parameter that is set (not 0 or '') wins over the settings, one left at 0 or '' leaves
      the field to them;
    - the ``settings`` argument: the rest of the stage's fields; the stage's defaults fill in.

    A field in the settings that the DAG sets (a read or a constant) is an error naming it.
    """
    stage = find(wiring["stage"])
    fields = dict(wiring["fixed"])
    for field, (argument, folder) in wiring["reads"].items():
        uri = join(inputs[argument].uri, folder) if folder else inputs[argument].uri
        name, dot, key = field.partition(".")
        if dot:
            fields.setdefault(name, {})[key] = uri
        else:
            fields[field] = uri
    fields["out"] = inputs[stage.artifact].uri
    settings = dict(inputs["settings"])
    clash = sorted(set(settings) & set(fields))
    if clash:
        raise ConfigError(clash[0], f"is set by the pipeline; remove it from the {stage.name} settings",
                          f"{stage.name} settings")
    settings.update({field: inputs[field] for field in wiring["params"] if is_set(inputs[field])})
    return from_dict(stage.config, {**settings, **fields}, where=f"{stage.name} settings")


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


def run_task(wiring: dict, inputs: dict):
    """Run the stage of a KFP task (:func:`task_config`) where its ``launcher`` input says
    (:class:`Launcher`; none: in this process), and fill the task's outputs (:data:`OUTPUTS`):
    the final numbers on ``metrics``, the HTML report; return the data fingerprint (``data``)
    or the summary's URI (``summary``).

    A file is always written at the metrics artifact's path: KFP's local cache
    treats a task whose output file is missing as a miss. A user's failure
    ends the task with its message and exit status (:mod:`kd_lib.errors`).
    """
    stage = wiring["stage"]

    def body() -> dict:
        from components.common import stage_run

        config = task_config(wiring, inputs)
        launch = from_dict(Launcher, inputs.get("launcher") or {}, where="launcher")
        if launch.kind == "torchx":
            return launch_with_torchx(stage, config, launch)
        os.environ[TASK_ENV] = "kfp"  # the output is this task's own: a retry takes over its lease
        with stage_run():
            return find(stage).run(config)

    result = exit_on_failure(f"kdp stage {stage}", body)
    if "metrics" in inputs:
        numbers = final_metrics(result)
        for name, value in numbers.items():
            inputs["metrics"].log_metric(name, value)
        with open(inputs["metrics"].path, "w") as f:
            json.dump(numbers, f)
    if wiring["output"] == "data":
        return result["data_fingerprint"]
    if wiring["output"] == "summary":
        with open(inputs["report"].path, "wb") as f:
            f.write(read_published(inputs["summary"].uri, "report.html"))
        return inputs["summary"].uri
    return None

"""Stage declarations: each stage says once what it is; everything else reads the declarations.

A stage is a module of this package, named after the stage (``lr_baseline`` for
``lr-baseline``), that declares itself at its end::

    STAGE = Stage("teacher", TeacherConfig, run, trains=True)

    if __name__ == "__main__":
        sys.exit(STAGE.main())

- ``name``: the stage's name in ``kdp stage NAME``, in messages and in manifests;
- ``config``: its config dataclass, whose fields are its flags (``kdp stage NAME --help``),
  its YAML keys and the keys of its settings in a pipeline;
- ``run(config) -> dict``: does the work and returns the manifest it published;
- ``trains``: it trains a model. It then runs data-parallel under ``torchrun``, its
  TorchX job may have several processes, its KFP task may launch it as such a job and
  retries after a failure (it resumes from its checkpoint), and ``kdp run --epochs`` sets
  its epochs;
- ``output``: what it publishes under ``out``, and so its KFP task's outputs
  (:data:`OUTPUTS`): ``model`` (a model folder, and the final metrics), ``data``
  (prepared data; the task also returns its fingerprint) or ``summary`` (the evaluation;
  the task also outputs the HTML report and returns the summary's URI).

Read from these declarations: ``kdp stage`` (:func:`find`, :func:`stages`), the KFP
components of the pipelines and their parameters (:mod:`pipelines.dag`), what those
components run (:func:`components.kfp_entry.run_task`), and the TorchX component
(:mod:`components.torchx_apps`).

Adding a stage: its module here, with its declaration; its line in the pipeline's DAG
table; its tests. Nothing else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kd_lib.config import ConfigError

#: What a stage publishes -> its KFP task's output artifacts (name, KFP artifact type).
OUTPUTS = {"model": {"model": "Model", "metrics": "Metrics"}, "data": {"data": "Dataset"},
           "summary": {"summary": "Artifact", "report": "HTML", "metrics": "Metrics"}}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipelines (see the module docstring)."""

    name: str
    config: type
    run: Callable[[Any], dict]
    trains: bool = False
    output: Literal["model", "data", "summary"] = "model"

    @property
    def artifact(self) -> str:
        """The output artifact that ``out`` is: the first of its :data:`OUTPUTS`."""
        return next(iter(OUTPUTS[self.output]))

    @property
    def summary(self) -> str:
        """What the stage does: the first line of its module's docstring, after the stage's name."""
        first = (sys.modules[self.run.__module__].__doc__ or "").strip().split("\n")[0]
        return first.partition(": ")[2] or first

    @property
    def module(self) -> str:
        """The stage's module, which ``python -m`` and ``torchrun -m`` run."""
        return f"{__package__}.{self.name.replace('-', '_')}"

    def main(self, argv: list[str] | None = None) -> int:
        """``kdp stage NAME [flags]``: parse the flags into the config and run the stage."""
        from components.common import stage_cli

        description = sys.modules[self.run.__module__].__doc__
        return stage_cli(self.config, self.run, argv, f"kdp stage {self.name}", description)


def _declared(module_name: str) -> Stage | None:
    stage = getattr(importlib.import_module(f"{__package__}.{module_name}"), "STAGE", None)
    if stage is None:
        return None
    if stage.module != f"{__package__}.{module_name}":
        raise TypeError(f"{__package__}.{module_name} declares stage {stage.name!r}: a stage's module "
                        f"is named after it, {stage.module}")
    return stage


@functools.cache
def stages() -> dict[str, Stage]:
    """Every declared stage, by name (this imports every module of the package)."""
    found = (_declared(info.name) for info in pkgutil.iter_modules(sys.modules[__package__].__path__))
    return {stage.name: stage for stage in found if stage is not None}


def find(name: str) -> Stage:
    """The stage called ``name`` (``lr-baseline`` or ``lr_baseline``); a ConfigError naming the
    stages when there is none. Imports the stage's own module only."""
    module_name = name.replace("-", "_")
    known = {info.name for info in pkgutil.iter_modules(sys.modules[__package__].__path__)}
    stage = _declared(module_name) if module_name.isidentifier() and module_name in known else None
    if stage is None:
        raise ConfigError("stage", f"unknown stage {name!r}; the stages are {', '.join(stages())}", "kdp")
    return stage

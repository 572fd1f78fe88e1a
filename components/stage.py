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
  its epochs.

Read from these declarations: ``kdp stage`` (:func:`find`, :func:`stages`), the KFP
components' ``run_stage`` (:mod:`components.kfp_entry`), the TorchX component
(:mod:`components.torchx_apps`), and the check of every task of a pipeline before it runs
(:mod:`pipelines.tasks`). A pipeline runs a stage in a task of its DAG; the task's
``settings`` input is the pipeline parameter that holds the stage's settings there.

Adding a stage: its module here, with its declaration; its task in the pipeline's DAG;
its tests. Nothing else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kd_lib.config import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage of the pipelines (see the module docstring)."""

    name: str
    config: type
    run: Callable[[Any], dict]
    trains: bool = False

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

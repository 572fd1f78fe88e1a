"""The stage tasks of a pipeline, read from its DAG, and the config each of them will run with.

A pipeline's DAG (``pipelines/*.py``) is the one place that says which stages it runs and how
they are wired. A *stage task* is a task with a ``settings`` input, fed by one ``*_settings``
pipeline parameter; its component function calls :func:`components.kfp_entry.run_stage` with
the task's inputs. :func:`plan` calls each stage task's function with what the pipeline would
give it (the parameters, the DAG's constants, stand-ins for upstream outputs) under
:func:`components.kfp_entry.planning`, where ``run_stage`` builds the stage's config, checks
it and stops. So every field of every task is checked in a second, wired exactly as the DAG
wires it, before anything runs; and the ``kdp run --set TASK.FIELD=VALUE`` names are the
tasks' display names.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from google.protobuf import json_format

from components.kfp_entry import Planned, planning
from components.stage import Stage, find
from kd_lib.config import ConfigError

#: The value of a required pipeline parameter that was not given, and the URI of stand-in artifacts.
STAND_IN = "-"


@dataclass
class StageTask:
    """One stage task of a pipeline."""

    name: str  # its display name: ``kdp run --set NAME.FIELD=VALUE``
    settings: str  # the pipeline parameter of its settings, e.g. ``onestage_settings``
    stage: Stage
    config: Any  # the stage config it runs with


def parameters(pipeline) -> dict[str, dict]:
    """The pipeline's parameters: name -> KFP parameter definition (type, default)."""
    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def plan(pipeline, params: dict) -> list[StageTask]:
    """The stage tasks of ``pipeline`` (a ``dsl.pipeline``) run with the parameters ``params``
    (others: their defaults), each with its checked config. Raises ConfigError naming the task
    and the field for a bad setting, and the parameter for one the pipeline does not have."""
    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    definitions = parameters(pipeline)
    unknown = sorted(set(params) - set(definitions))
    if unknown:
        raise ConfigError(unknown[0], f"is not a parameter of the pipeline; its parameters are "
                          f"{', '.join(definitions)}", spec["pipelineInfo"]["name"])
    values = {name: params.get(name, definition.get("defaultValue", STAND_IN))
              for name, definition in definitions.items()}
    module = sys.modules[pipeline.pipeline_func.__module__]
    tasks = []
    for task_id, task in spec["root"]["dag"]["tasks"].items():
        inputs = task.get("inputs", {})
        settings = inputs.get("parameters", {}).get("settings", {}).get("componentInputParameter")
        if settings is None:
            continue
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        args = spec["deploymentSpec"]["executors"][executor]["container"]["args"]
        function = getattr(module, args[args.index("--function_to_execute") + 1])
        name = task["taskInfo"]["name"]
        try:
            with planning():
                function(**task_arguments(function, task_id, inputs, values))
        except Planned as planned:
            tasks.append(StageTask(name, settings, find(planned.stage), planned.config))
        except ConfigError as err:
            raise ConfigError(err.field, err.message, f"{name} ({settings})") from None
        else:
            raise TypeError(f"{task_id}: {function.__name__} has a settings input but runs no stage")
    return tasks


def task_arguments(function, task_id: str, inputs: dict, values: dict) -> dict:
    """The arguments of a task's component function: its parameters as the DAG feeds them,
    stand-in artifacts (``.uri``, ``.path``) for its input and output artifacts."""
    def parameter(source: dict):
        if "componentInputParameter" in source:
            return values[source["componentInputParameter"]]
        if "runtimeValue" in source:
            return source["runtimeValue"]["constant"]
        return STAND_IN  # an upstream task's output parameter

    arguments = {name: parameter(source) for name, source in inputs.get("parameters", {}).items()}
    for name in inspect.signature(function).parameters.keys() - arguments.keys():
        arguments[name] = SimpleNamespace(uri=f"{task_id}/{name}", path=None)
    return arguments

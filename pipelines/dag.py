"""A pipeline as its DAG table: which stage each task runs and what it reads. The rest is derived.

A :class:`Pipeline` lists its :class:`Task` s in the order they run. From the table and the
stage declarations (:mod:`components.stage`) come:

- the KFP pipeline (:meth:`Pipeline.build`): one component per task, whose typed inputs are
  the fields that the DAG feeds (upstream outputs, typed parameters), its ``settings``,
  ``code_version`` and ``rerun_token``, and whose outputs are its stage's
  (:data:`components.stage.OUTPUTS`); each task's display name is its name;
- the pipeline's parameters, in this order: the typed parameters, then one
  ``TASK_settings`` (the task's settings, a mapping of its stage's config fields, default
  the task's ``settings``) and one ``rerun_TASK`` (a new value reruns that task and what
  reads it, :mod:`pipelines.cluster`) per task, ``TASK`` being its name with ``_`` for ``-``;
- :meth:`Pipeline.plan`: every task's config, checked as the DAG wires it, before anything runs.

Wiring. A config field ``data`` reads the data task's output (the task whose stage
publishes ``data``); ``reads`` adds others (``field: TASK`` or ``TASK/FOLDER``; ``models.NAME``
is the key NAME of the field ``models``). A field named like a typed parameter is fed by it
(unless the task reads or fixes it), and ``params`` feeds fields from parameters of other
names (``arch: teacher_arch``). A typed
parameter's default is the default of the stage fields it feeds (they must agree), unless
the table gives one: :data:`UNSET` (0 or '': each task's settings, then its stage's default,
decide), :data:`REQUIRED`, or a value where the pipeline differs from the stages. ``fixed``
sets fields to constants (the detector's ``view``), and a task's ``settings`` default is
where a pipeline changes a stage's default (the one-stage student's method). Settings of a
task never set what the DAG sets; a typed parameter that is set wins over them.

The gate (:class:`Gate`, optional): the gated tasks run only when the gate passes
(``dsl.If``); otherwise (``dsl.Else``) the summary task runs on the ungated tasks alone, and
the pipeline returns the summary of the branch that ran (``dsl.OneOf``).

KFP runs a lightweight component from its source text, so each task's component is written
as text (three lines that pass its arguments and its wiring to
:func:`components.kfp_entry.run_task`) and compiled here; ``inspect`` reads it back through
:mod:`linecache`, as for any function.
"""


import dataclasses
import functools
import inspect
import linecache
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGES
from components.kfp_entry import is_set, task_config
from components.stage import OUTPUTS, Stage, find
from kd_lib.config import ConfigError, field_default, field_texts
from pipelines.cluster import ClusterOptions, configure_task, launcher_input

#: Parameter defaults a table may give: the parameter must be given; it leaves its fields to the settings.
REQUIRED, UNSET = inspect.Parameter.empty, "<unset>"
#: The URI of stand-in artifacts and the value of missing required parameters in :meth:`Pipeline.plan`.
STAND_IN = "-"
KFP_TYPES = {"Input": Input, "Output": Output, "Dataset": Dataset, "Model": Model, "Metrics": Metrics,
             "Artifact": Artifact, "HTML": HTML}


@dataclass(frozen=True)
class Task:
    """One task of a pipeline's DAG (module docstring): it runs ``stage`` (default: its name)."""

    name: str
    stage: str = ""
    reads: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    gated: bool = False

    @functools.cached_property
    def declaration(self) -> Stage:
        return find(self.stage or self.name)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def settings_parameter(self) -> str:
        return f"{self.key}_settings"

    @property
    def rerun_parameter(self) -> str:
        return f"rerun_{self.key}"


@dataclass(frozen=True)
class Gate:
    """Run the gated tasks only when ``model``'s final val top-1 beats ``baseline``'s by the
    ``min_teacher_margin`` parameter (:mod:`components.gate`)."""

    model: str
    baseline: str
    name: str = "teacher-gate"
    help: str = ("train the gated tasks only if the teacher's val top-1 beats the LR baseline's by at least "
                 "this many points")


@dataclass(frozen=True)
class StageTask:
    """One stage task of a pipeline, as :meth:`Pipeline.plan` checked it."""

    name: str  # its display name: ``kdp run --set NAME.FIELD=VALUE``
    settings: str  # the pipeline parameter of its settings, e.g. ``student_onestage_settings``
    stage: Stage
    config: Any  # the stage config it runs with


def source_version(source: str, images: str) -> str:
    """source-version: a fingerprint of the listing of ``source`` (and ``images``): every file's
    path, size and checksum, read without downloading. The task is never cached and the data task
    takes its output as an input, so it and everything after it are cache hits exactly when the
    data did not change (a scheduled run on unchanged data retrains nothing)."""
    from kd_lib.io.fs import listing_fingerprint
    return listing_fingerprint(*(uri for uri in (source, images) if uri))


def teacher_gate(code_version: str, teacher: Input[Model], lr_baseline: Input[Model], min_teacher_margin: float
                    ) -> NamedTuple("Outputs", [("passed", bool), ("decision", dict)]):
    """teacher-gate: does the teacher beat the LR baseline by ``min_teacher_margin`` points of top-1?"""
    from collections import namedtuple
    from components.gate import run
    decision = run(teacher.uri, lr_baseline.uri, min_teacher_margin)
    return namedtuple("Outputs", ["passed", "decision"])(decision["passed"], decision)


#: A config class's resolved field types (resolving them compiles each annotation: once per class).
type_hints = functools.cache(typing.get_type_hints)


def kfp_type(hint) -> str:
    """The KFP parameter type of a config field's type hint (a ``Literal`` of strings is a string)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0]).__name__
    return (origin or hint).__name__


@dataclass(frozen=True)
class Pipeline:
    """A pipeline's DAG table (module docstring). ``parameters``: each typed parameter, in order,
    with its default (:data:`REQUIRED`, :data:`UNSET`, a value, or ``None``: its fields' default)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    tasks: tuple[Task, ...]
    gate: Gate | None = None

    def task(self, name: str) -> Task:
        return next(task for task in self.tasks if task.name == name)

    @functools.cached_property
    def data_task(self) -> Task:
        return next(task for task in self.tasks if task.declaration.output == "data")

    @functools.cached_property
    def summary_task(self) -> Task:
        """The task whose summary the pipeline returns: the last that publishes one."""
        return [task for task in self.tasks if task.declaration.output == "summary"][-1]

    def reads(self, task: Task) -> dict[str, tuple[str, str]]:
        """Field -> (upstream task, folder) of what ``task`` reads."""
        fields = {f.name for f in dataclasses.fields(task.declaration.config)}
        reads = {"data": self.data_task.name} if "data" in fields and task is not self.data_task else {}
        reads.update(task.reads)
        return {name: tuple(ref.partition("/")[::2]) for name, ref in reads.items()}

    def fed(self, task: Task) -> dict[str, str]:
        """Field -> the typed parameter that feeds it, for ``task`` (not the fields it fixes or reads)."""
        fields = [f.name for f in dataclasses.fields(task.declaration.config)]
        fed = {name: name for name in fields if name in self.parameters and name not in {**task.fixed, **task.reads}}
        fed.update(task.params)
        return fed

    def wiring(self, task: Task, reads: dict[str, tuple[str, str]]) -> dict:
        """What :func:`components.kfp_entry.task_config` needs to know of ``task``, besides its inputs."""
        fed = self.fed(task)
        if self.gate is not None and task is self.summary_task:
            fed["gate"] = "gate"
        return {"stage": task.declaration.name, "output": task.declaration.output, "fixed": dict(task.fixed),
                "params": list(fed),
                "reads": {name: [self.argument(up), folder] for name, (up, folder) in reads.items()}}

    def argument(self, upstream: str) -> str:
        """The input of a component that holds the output artifact of the task ``upstream``."""
        return "data" if upstream == self.data_task.name else upstream.replace("-", "_")

    @functools.cached_property
    def defaults(self) -> dict[str, tuple[str, Any]]:
        """Each typed parameter -> (its KFP type, its default; :data:`REQUIRED` for none)."""
        fed: dict[str, list[tuple[Any, Any]]] = {name: [] for name in self.parameters}
        for task in self.tasks:
            config = task.declaration.config
            hints, specs = type_hints(config), {f.name: f for f in dataclasses.fields(config)}
            for name, parameter in self.fed(task).items():
                fed[parameter].append((hints[name], field_default(specs[name])))
        found = {}
        for name, given in self.parameters.items():
            if fed[name]:
                kinds = {kfp_type(hint) for hint, _ in fed[name]}
                defaults = {repr(default) for _, default in fed[name]}
                kind = kinds.pop()
                if kinds or (given is None and len(defaults) > 1):
                    raise TypeError(f"{self.name}: parameter {name} feeds fields of types or defaults that differ "
                                    f"({fed[name]}): give it its own default in the table")
                stage_default = fed[name][0][1]
            else:
                kind, stage_default = type(given).__name__, given
            default = stage_default if given is None else {"int": 0, "float": 0.0, "str": ""}[kind] \
                if given == UNSET else given
            found[name] = (kind, default)
        return found

    def own_defaults(self, parameter: str) -> dict[str, Any]:
        """What the fields that ``parameter`` feeds are when it is left unset, by stage (a task's settings
        default, else its stage's default)."""
        found = {}
        for task in self.tasks:
            specs = {f.name: f for f in dataclasses.fields(task.declaration.config)}
            for name, fed in self.fed(task).items():
                if fed == parameter:
                    found.setdefault(task.declaration.name, task.settings.get(name, field_default(specs[name])))
        return found

    def parameter_help(self) -> dict[str, str]:
        """A line of help per typed parameter: the docstring of the first field it feeds."""
        texts = {"min_teacher_margin": self.gate.help} if self.gate else {}
        for task in self.tasks:
            docs = field_texts(task.declaration.config)
            for name, parameter in self.fed(task).items():
                texts.setdefault(parameter, docs[name])
        return texts

    def signature(self) -> inspect.Signature:
        """The pipeline function's parameters (module docstring)."""
        kfp_types = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=kfp_types[kind]) for name, (kind, default) in self.defaults.items()]
        parameters += [inspect.Parameter(task.settings_parameter, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         default=dict(task.settings), annotation=dict) for task in self.tasks]
        parameters += [inspect.Parameter(task.rerun_parameter, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         default="", annotation=str) for task in self.tasks]
        return inspect.Signature(parameters, return_annotation=str)

    def component(self, task: Task, reads: dict[str, tuple[str, str]], function_name: str):
        """The KFP component of ``task`` reading ``reads`` (module docstring)."""
        stage = task.declaration
        hints = type_hints(stage.config)
        wiring = self.wiring(task, reads)
        inputs = {self.argument(up): f"Input[{'Dataset' if up == self.data_task.name else 'Model'}]"
                  for up, _ in reads.values()}
        inputs |= {name: kfp_type(hints[name]) for name in self.fed(task)}
        inputs |= {"settings": "dict", "code_version": "str", "rerun_token": "str"}
        if "data" in reads:
            inputs["data_fingerprint"] = "str"
        if stage.output == "data":
            inputs["source_version"] = "str"
        if stage.trains:
            inputs["launcher"] = "dict"
        if "gate" in wiring["params"]:
            inputs["gate"] = "dict"
        outputs = {name: f"Output[{kind}]" for name, kind in OUTPUTS[stage.output].items()}
        if set(inputs) & set(outputs):
            raise TypeError(f"{self.name}: task {task.name} has an input named like one of its outputs")
        arguments = ", ".join(f"{name}: {kind}" for name, kind in {**inputs, **outputs}.items())
        returns = " -> str" if stage.output in ("data", "summary") else ""
        source = (f"def {function_name}({arguments}){returns}:\n"
                  f'    """{task.name}: {stage.summary}"""\n'
                  "    inputs = dict(locals())\n"
                  "    from components.kfp_entry import run_task\n"
                  f"    return run_task({wiring!r}, inputs)\n")
        filename = f"<{self.name} task {function_name}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        namespace: dict[str, Any] = dict(KFP_TYPES)
        exec(compile(source, filename, "exec"), namespace)
        return dsl.component(base_image=IMAGES["train"], install_kfp_package=False)(namespace[function_name])

    def build(self, options: ClusterOptions | None = None):
        """The KFP pipeline, its tasks configured with ``options`` (:func:`pipelines.cluster.configure_task`:
        each task's image, resources and pod settings; None: no cluster settings, for kfp.local)."""
        component = dsl.component(base_image=IMAGES["train"], install_kfp_package=False)
        source_version_op, teacher_gate_op = component(source_version), component(teacher_gate)
        launcher = launcher_input(options)
        signature = self.signature()
        gated = {task.name for task in self.tasks if task.gated}
        for task in self.tasks:
            if not task.gated and gated & {up for up, _ in self.reads(task).values()}:
                raise TypeError(f"{self.name}: task {task.name} reads a gated task, so it must be gated too")

        def add(task: Task, made: dict, values: dict, reads: dict, function_name: str, gate=None):
            arguments = {self.argument(up): made[up].outputs[self.task(up).declaration.artifact]
                         for up, _ in reads.values()}
            arguments |= {name: values[parameter] for name, parameter in self.fed(task).items()}
            arguments |= {"settings": values[task.settings_parameter], "code_version": values["code_version"],
                          "rerun_token": values[task.rerun_parameter]}
            if "data" in reads:
                arguments["data_fingerprint"] = made[self.data_task.name].outputs["Output"]
            if task.declaration.output == "data":
                arguments["source_version"] = made["source-version"].output
            if task.declaration.trains:
                arguments["launcher"] = launcher
            if gate is not None and task is self.summary_task:
                arguments["gate"] = gate.outputs["decision"]
            made[task.name] = self.component(task, reads, function_name)(**arguments)
            configure_task(made[task.name].set_display_name(task.name), options)
            return made[task.name]

        def body(*given):
            values = dict(zip(signature.parameters, given))
            made = {"source-version": source_version_op(source=values["source"], images=values.get("images", ""))}
            configure_task(made["source-version"].set_display_name("source-version"), options, cached=False)
            for task in self.tasks:
                if not task.gated:
                    add(task, made, values, self.reads(task), task.key)
            if self.gate is None:
                return made[self.summary_task.name].outputs["Output"]
            gate = teacher_gate_op(code_version=values["code_version"], teacher=made[self.gate.model].outputs["model"],
                                   lr_baseline=made[self.gate.baseline].outputs["model"],
                                   min_teacher_margin=values["min_teacher_margin"])
            configure_task(gate.set_display_name(self.gate.name), options)
            with dsl.If(gate.outputs["passed"] == True, name="gate-passed"):  # noqa: E712
                for task in self.tasks:
                    if task.gated:
                        add(task, made, values, self.reads(task), task.key, gate)
            summary = made[self.summary_task.name]
            with dsl.Else(name="gate-closed"):
                task = self.summary_task
                ungated = {name: read for name, read in self.reads(task).items() if read[0] not in gated}
                fallback = add(task, made, values, ungated, f"{task.key}_ungated", gate)
            return dsl.OneOf(summary.outputs["Output"], fallback.outputs["Output"])

        body.__name__ = self.name.replace("-", "_")
        body.__signature__ = signature
        return dsl.pipeline(name=self.name, description=self.description,
                            pipeline_root=options.root if options else None)(body)

    def plan(self, params: dict) -> list[StageTask]:
        """The stage tasks run with the parameters ``params`` (others: their defaults), each with
        its checked config. Raises ConfigError naming the task and the settings parameter (or the
        typed parameter) for a bad setting, and the parameter for one the pipeline does not have."""
        signature = self.signature()
        unknown = sorted(set(params) - set(signature.parameters))
        if unknown:
            raise ConfigError(unknown[0], f"is not a parameter of the pipeline; its parameters are "
                              f"{', '.join(signature.parameters)}", self.name)
        values = {name: params.get(name, STAND_IN if p.default is REQUIRED else p.default)
                  for name, p in signature.parameters.items()}
        tasks = []
        for task in self.tasks:
            wiring = self.wiring(task, self.reads(task))
            inputs = {argument: SimpleNamespace(uri=f"{argument}/{STAND_IN}")
                      for argument, _ in wiring["reads"].values()}
            inputs |= {name: values[parameter] for name, parameter in self.fed(task).items()}
            inputs |= {name: SimpleNamespace(uri=f"{task.key}/{name}") for name in OUTPUTS[task.declaration.output]}
            inputs |= {"settings": values[task.settings_parameter], "gate": {}}
            try:
                config = task_config(wiring, inputs)
            except ConfigError as err:
                fed = self.fed(task).get(err.field)
                source = f"parameter {fed}" if fed and is_set(inputs[err.field]) else task.settings_parameter
                raise ConfigError(err.field, err.message, f"{task.name} ({source})") from None
            tasks.append(StageTask(task.name, task.settings_parameter, task.declaration, config))
        return tasks


"""The classification pipeline as KFP v2 lightweight components.

    prepare-data -> teacher + lr-baseline -> teacher-gate
    gate passed: teacher -> assistant -> student (TAS: method tas from the assistant) -> export
                 teacher -> student-onestage (method kd+isrd from the teacher)
                 all five models and the export -> evaluate
    otherwise:   teacher + lr-baseline -> evaluate

Each component runs one stage of ``components/`` in the image of its role
(:mod:`components.image`; ``install_kfp_package=False``: both images have
``kfp``). Stage
outputs are the output artifacts' URIs. The data fingerprint from
prepare-data is passed to every training task as a parameter, so that the
cache key of everything downstream changes exactly when the data does.

``code_version`` names the code (an image tag, or a hash of the sources for
local runs): it is an input of every task, so new code misses the cache.

Pipeline parameters: the shared fields (``hr_size``, ``ratio``, ``seed``,
the two architectures, and where they start from: ``teacher_weights`` for the
teacher, ``student_weights`` for the assistant, the one-stage student and the LR
baseline, see :mod:`kd_lib.models.weights`); the most tuned settings, typed: ``epochs`` and ``lr``
of every training task (0: each stage's own setting) and the two students'
methods (``student_method``: TAS from the assistant; ``onestage_method``:
one-stage pixel distillation, KD + ISRD, from the teacher); and, per stage, a
``*_settings`` mapping of that stage's config fields (``{"epochs": 30, "lr":
0.05}``; a ``method`` there wins over the typed one); unknown or bad fields
fail the stage with an error naming the field.

The teacher gate compares the teacher's and the LR baseline's val top-1
(:mod:`components.gate`): with ``min_teacher_margin`` X, the assistant and the
students run only when the teacher beats the baseline by at least X points;
otherwise they show as skipped, and the run ends with the evaluation of the
two models it trained, whose summary carries the gate's message. The default
(-100) lets every teacher through. The pipeline's output is the URI of the
evaluation's summary folder (a parameter: one of two conditional branches).

Per-stage reruns: ``rerun_prepare``, ``rerun_teacher``, ... (one per
``*_settings`` key): a new value reruns that stage and, through its new
output, the stages that read it; everything else stays cached. Caching,
resources and pod settings of each task: :mod:`pipelines.cluster`.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGES
from kd_lib.eval.verdicts import GATE_OFF
from pipelines.cluster import ClusterOptions, configure_task, launcher_input

PIPELINE_NAME = "pixel-distillation"
#: Per-stage settings unless told otherwise, sized for real data trained from scratch. The ISRD
#: students keep the official lr 0.01: with eta = 50, higher rates make the decoder and the first
#: layer diverge.
DEFAULT_SETTINGS = {
    "prepare": {},
    "teacher": {"epochs": 12, "lr": 0.05},
    "assistant": {"epochs": 10, "lr": 0.05},
    "student": {"epochs": 10},
    "onestage": {"epochs": 10},
    "lr_baseline": {"epochs": 10, "lr": 0.05},
    "export": {},
    "evaluate": {},
}


def source_version_op(source: str, images: str) -> str:
    """source-version: a fingerprint of the listing of ``source`` (and ``images``): every file's
    path, size and checksum, read without downloading. The task is never cached and prepare-data
    takes its output as an input, so prepare-data and everything after it are cache hits exactly
    when the data did not change (a scheduled run on unchanged data retrains nothing)."""
    from kd_lib.io.fs import listing_fingerprint
    return listing_fingerprint(*(uri for uri in (source, images) if uri))


def prepare_data_op(source: str, source_version: str, settings: dict, code_version: str, rerun_token: str,
                    data: Output[Dataset]) -> str:
    """prepare-data: validate the ImageFolder at ``source``, write Parquet shards."""
    from components.kfp_entry import run_stage
    return run_stage("prepare-data", settings, source=source, out=data.uri)["data_fingerprint"]


def teacher_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
               settings: dict, epochs: int, lr: float, arch: str, weights: str, hr_size: int, ratio: int, seed: int,
               checkpoint_root: str, model: Output[Model], metrics: Output[Metrics]):
    """teacher: the large model at HR, started from ``weights``, cross-entropy."""
    from components.kfp_entry import run_stage, tuned
    run_stage("teacher", tuned(settings, epochs, lr), metrics, launcher, data=data.uri, out=model.uri, arch=arch,
              weights=weights, hr_size=hr_size, ratio=ratio, seed=seed, checkpoint_root=checkpoint_root)


def assistant_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
                 teacher: Input[Model], settings: dict, epochs: int, lr: float, arch: str, weights: str,
                 hr_size: int, ratio: int, seed: int, checkpoint_root: str, model: Output[Model],
                 metrics: Output[Metrics]):
    """assistant: the small model at HR, started from ``weights``, distilled from the teacher."""
    from components.kfp_entry import run_stage, tuned
    run_stage("assistant", tuned(settings, epochs, lr), metrics, launcher, data=data.uri, out=model.uri, teacher=teacher.uri, arch=arch,
              weights=weights, hr_size=hr_size, ratio=ratio, seed=seed, checkpoint_root=checkpoint_root)


def student_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
               source: Input[Model], source_field: str, method: str, settings: dict, epochs: int, lr: float,
               arch: str, weights: str, hr_size: int, ratio: int, seed: int, checkpoint_root: str,
               model: Output[Model], metrics: Output[Metrics]):
    """student: the small model at LR, distilled from ``source`` (the assistant or the teacher)
    with ``method`` unless the settings name another; started from the assistant (``source_field``
    assistant) or from ``weights``."""
    from components.kfp_entry import run_stage, tuned
    run_stage("student", {"method": method, **tuned(settings, epochs, lr)}, metrics, launcher, data=data.uri, out=model.uri,
              arch=arch, hr_size=hr_size, ratio=ratio, seed=seed, checkpoint_root=checkpoint_root,
              **{source_field: source.uri}, **({"weights": weights} if weights else {}))


def lr_baseline_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
                   settings: dict, epochs: int, lr: float, arch: str, weights: str, hr_size: int, ratio: int,
                   seed: int, checkpoint_root: str, model: Output[Model], metrics: Output[Metrics]):
    """lr-baseline: the student's architecture at LR, started from ``weights``, cross-entropy only."""
    from components.kfp_entry import run_stage, tuned
    run_stage("lr-baseline", tuned(settings, epochs, lr), metrics, launcher, data=data.uri, out=model.uri, arch=arch,
              weights=weights, hr_size=hr_size, ratio=ratio, seed=seed, checkpoint_root=checkpoint_root)


def export_op(data: Input[Dataset], code_version: str, rerun_token: str, source: Input[Model], folder: str,
              settings: dict, model: Output[Model], metrics: Output[Metrics]):
    """export: the model at ``source`` (its ``folder``, if given) as ONNX and int8 ONNX, checked in onnxruntime."""
    from components.kfp_entry import run_stage
    from kd_lib.io.fs import join
    run_stage("export", settings, metrics, data=data.uri, out=model.uri,
              model=join(source.uri, folder) if folder else source.uri)


def teacher_gate_op(code_version: str, teacher: Input[Model], lr_baseline: Input[Model], min_teacher_margin: float
                    ) -> NamedTuple("Outputs", [("passed", bool), ("decision", dict)]):
    """teacher-gate: does the teacher beat the LR baseline by ``min_teacher_margin`` points of top-1?"""
    from collections import namedtuple
    from components.gate import run
    decision = run(teacher.uri, lr_baseline.uri, min_teacher_margin)
    return namedtuple("Outputs", ["passed", "decision"])(decision["passed"], decision)


def evaluate_op(data: Input[Dataset], code_version: str, rerun_token: str, teacher: Input[Model],
                lr_baseline: Input[Model], gate: dict, settings: dict, hr_size: int, ratio: int,
                summary: Output[Artifact], report: Output[HTML], metrics: Output[Metrics],
                assistant: Input[Model] = None, student: Input[Model] = None,
                student_onestage: Input[Model] = None, student_export: Input[Model] = None) -> str:
    """evaluate: accuracy, FLOPs, latency and input bytes of every model given, the student's
    export; summary, verdicts and report. Returns the summary folder's URI."""
    from components.kfp_entry import run_stage
    from kd_lib.io.manifest import read_published
    given = {"teacher": teacher, "assistant": assistant, "student": student, "student_onestage": student_onestage,
             "lr_baseline": lr_baseline}
    run_stage("evaluate", settings, metrics, data=data.uri, out=summary.uri, hr_size=hr_size, ratio=ratio,
              models={name: model.uri for name, model in given.items() if model is not None}, gate=gate,
              exports={"student": student_export.uri} if student_export is not None else {},
              code_version=code_version)
    with open(report.path, "wb") as f:
        f.write(read_published(summary.uri, "report.html"))
    return summary.uri


def build_pipeline(options: ClusterOptions | None = None):
    """The pipeline function, its tasks configured with ``options`` (:func:`pipelines.cluster.configure_task`:
    each task's image, resources and pod settings; None: no cluster settings, for kfp.local)."""
    component = dsl.component(base_image=IMAGES["train"], install_kfp_package=False)
    (source_version, prepare, train_teacher, train_assistant, train_student, train_lr_baseline, teacher_gate,
     export, evaluate) = (component(op) for op in (source_version_op, prepare_data_op, teacher_op, assistant_op,
                                                   student_op, lr_baseline_op, teacher_gate_op, export_op,
                                                   evaluate_op))
    launcher = launcher_input(options)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n\n")[0],
                  pipeline_root=options.root if options else None)
    def pixel_distillation(
        source: str,
        checkpoint_root: str,
        hr_size: int = 64,
        ratio: int = 4,
        seed: int = 0,
        teacher_arch: str = "resnet34",
        student_arch: str = "resnet18",
        teacher_weights: str = "",
        student_weights: str = "",
        epochs: int = 0,
        lr: float = 0.0,
        student_method: str = "tas",
        onestage_method: str = "kd+isrd",
        min_teacher_margin: float = GATE_OFF,
        prepare_settings: dict = DEFAULT_SETTINGS["prepare"],
        teacher_settings: dict = DEFAULT_SETTINGS["teacher"],
        assistant_settings: dict = DEFAULT_SETTINGS["assistant"],
        student_settings: dict = DEFAULT_SETTINGS["student"],
        onestage_settings: dict = DEFAULT_SETTINGS["onestage"],
        lr_baseline_settings: dict = DEFAULT_SETTINGS["lr_baseline"],
        export_settings: dict = DEFAULT_SETTINGS["export"],
        evaluate_settings: dict = DEFAULT_SETTINGS["evaluate"],
        code_version: str = "",
        rerun_prepare: str = "",
        rerun_teacher: str = "",
        rerun_assistant: str = "",
        rerun_student: str = "",
        rerun_onestage: str = "",
        rerun_lr_baseline: str = "",
        rerun_export: str = "",
        rerun_evaluate: str = "",
    ) -> str:
        version = source_version(source=source, images="")
        data = prepare(source=source, source_version=version.output, settings=prepare_settings,
                       code_version=code_version, rerun_token=rerun_prepare)
        common = dict(data=data.outputs["data"], data_fingerprint=data.outputs["Output"], hr_size=hr_size,
                      ratio=ratio, seed=seed, checkpoint_root=checkpoint_root, code_version=code_version,
                      launcher=launcher, epochs=epochs, lr=lr)
        teacher = train_teacher(settings=teacher_settings, arch=teacher_arch, weights=teacher_weights,
                                rerun_token=rerun_teacher, **common)
        baseline = train_lr_baseline(settings=lr_baseline_settings, arch=student_arch, weights=student_weights,
                                     rerun_token=rerun_lr_baseline, **common)
        gate = teacher_gate(code_version=code_version, teacher=teacher.outputs["model"],
                            lr_baseline=baseline.outputs["model"], min_teacher_margin=min_teacher_margin)
        evaluated = dict(data=data.outputs["data"], code_version=code_version, rerun_token=rerun_evaluate,
                         teacher=teacher.outputs["model"], lr_baseline=baseline.outputs["model"],
                         gate=gate.outputs["decision"], settings=evaluate_settings, hr_size=hr_size, ratio=ratio)
        with dsl.If(gate.outputs["passed"] == True, name="teacher-beats-baseline"):  # noqa: E712
            assistant = train_assistant(teacher=teacher.outputs["model"], settings=assistant_settings,
                                        arch=student_arch, weights=student_weights, rerun_token=rerun_assistant,
                                        **common)
            student = train_student(source=assistant.outputs["model"], source_field="assistant",
                                    method=student_method, settings=student_settings,
                                    arch=student_arch, weights="", rerun_token=rerun_student, **common)
            onestage = train_student(source=teacher.outputs["model"], source_field="teacher",
                                     method=onestage_method, settings=onestage_settings,
                                     arch=student_arch, weights=student_weights, rerun_token=rerun_onestage, **common)
            exported = export(data=data.outputs["data"], code_version=code_version, rerun_token=rerun_export,
                              source=student.outputs["model"], folder="", settings=export_settings)
            report = evaluate(assistant=assistant.outputs["model"], student=student.outputs["model"],
                              student_onestage=onestage.outputs["model"], student_export=exported.outputs["model"],
                              **evaluated)
        with dsl.Else(name="teacher-below-margin"):
            short_report = evaluate(**evaluated)
        for task, name in ((data, "prepare-data"), (teacher, "teacher"), (assistant, "assistant"),
                           (student, "student"), (onestage, "student-onestage"), (baseline, "lr-baseline"),
                           (gate, "teacher-gate"), (exported, "export"), (report, "evaluate"),
                           (short_report, "evaluate")):
            configure_task(task.set_display_name(name), options)
        configure_task(version.set_display_name("source-version"), options, cached=False)
        return dsl.OneOf(report.outputs["Output"], short_report.outputs["Output"])

    return pixel_distillation

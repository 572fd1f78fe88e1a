"""The detection pipeline as KFP v2 lightweight components.

    prepare-data (COCO or YOLO) -> teacher (detector, HR) -> afp (method afp: assistant + student) -> export
                                                          \\-> afp (method msad: MSAD teacher + student)
                                -> lr-baseline (detector, LR)
    all of them -> evaluate (COCO mAP, GFLOPs, latency, input bytes)

Built like :mod:`pipelines.pixel_distillation`: each component runs one
stage of ``components/`` in the image of its role, stage outputs are the
output artifacts' URIs, the data fingerprint and ``code_version`` are inputs
of every training task so that the cache follows data and code. Parameters:
the shared fields (``ratio``, ``seed``, ``kind``, the pyramid's width
``fpn_channels``, the two backbones and where
they start from, ``teacher_backbone_weights`` and ``student_backbone_weights``:
a classification checkpoint's trunk such as the classification pipeline's
teacher, see :mod:`kd_lib.models.weights`), the
letterbox side ``image_size``, the typed ``epochs`` and ``lr`` of every
training task (0: each stage's own setting), a ``*_settings`` mapping per stage, and a
``rerun_*`` token per stage (a new value reruns that stage and what reads its
output; see :mod:`pipelines.cluster`).
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGES
from pipelines.cluster import ClusterOptions, configure_task, launcher_input
from pipelines.pixel_distillation import export_op, source_version_op

PIPELINE_NAME = "detection-distillation"
#: Per-stage settings unless told otherwise.
DEFAULT_SETTINGS = {
    "prepare": {},
    "teacher": {"epochs": 24},
    "afp": {"epochs": 12},
    "msad": {"epochs": 12},
    "lr_baseline": {"epochs": 24},
    "export": {},
    "evaluate": {"latency_batch_sizes": [1, 8]},
}


def prepare_detection_op(source: str, images: str, source_version: str, image_size: int, settings: dict,
                         code_version: str, rerun_token: str, data: Output[Dataset]) -> str:
    """prepare-data: read COCO JSON (``images``: its image folder) or YOLO, letterbox, write shards."""
    from components.kfp_entry import run_stage
    fields = {"images": images} if images else {}
    return run_stage("prepare-data", settings, source=source, out=data.uri, image_size=image_size,
                     **fields)["data_fingerprint"]


def detector_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
                settings: dict, epochs: int, lr: float, view: str, kind: str, backbone: str, fpn_channels: int,
                weights: str, ratio: int, seed: int, checkpoint_root: str, model: Output[Model],
                metrics: Output[Metrics]):
    """detector: a detector trained with its detection loss alone on the HR or LR image, its backbone
    started from ``weights``."""
    from components.kfp_entry import run_stage, tuned
    run_stage("detector", tuned(settings, epochs, lr), metrics, launcher, data=data.uri, out=model.uri, view=view, kind=kind,
              backbone=backbone, fpn_channels=fpn_channels, weights=weights, ratio=ratio, seed=seed,
              checkpoint_root=checkpoint_root)


def afp_op(data: Input[Dataset], data_fingerprint: str, code_version: str, rerun_token: str, launcher: dict,
           teacher: Input[Model], method: str, settings: dict, epochs: int, lr: float, kind: str, backbone: str,
           fpn_channels: int, weights: str, ratio: int, seed: int, checkpoint_root: str, model: Output[Model],
           metrics: Output[Metrics]):
    """afp: the aligned HR assistant (or MSAD teacher), its backbone started from ``weights``, and the
    LR student distilled through it."""
    from components.kfp_entry import run_stage, tuned
    run_stage("afp", tuned(settings, epochs, lr), metrics, launcher, data=data.uri, out=model.uri, teacher=teacher.uri, method=method,
              kind=kind, backbone=backbone, fpn_channels=fpn_channels, weights=weights, ratio=ratio, seed=seed,
              checkpoint_root=checkpoint_root)


def evaluate_detection_op(data: Input[Dataset], code_version: str, rerun_token: str, teacher: Input[Model],
                          afp: Input[Model], msad: Input[Model], lr_baseline: Input[Model], student_export: Input[Model],
                          settings: dict, summary: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]):
    """evaluate: COCO mAP, FLOPs, latency and input bytes of every detector, the AFP student's export;
    summary and report."""
    from components.kfp_entry import detection_models, run_stage
    from kd_lib.io.manifest import read_published
    models = detection_models(teacher=teacher.uri, afp=afp.uri, msad=msad.uri, lr_baseline=lr_baseline.uri)
    run_stage("evaluate", settings, metrics, data=data.uri, out=summary.uri, models=models,
              exports={"student_afp": student_export.uri})
    with open(report.path, "wb") as f:
        f.write(read_published(summary.uri, "report.html"))


def build_pipeline(options: ClusterOptions | None = None):
    """The detection pipeline function, its tasks configured with ``options``
    (:func:`pipelines.cluster.configure_task`: each task's image, resources and pod settings; None:
    no cluster settings, for kfp.local)."""
    component = dsl.component(base_image=IMAGES["train"], install_kfp_package=False)
    source_version, prepare, train_detector, train_afp, export, evaluate = (
        component(op) for op in (source_version_op, prepare_detection_op, detector_op, afp_op, export_op,
                                 evaluate_detection_op))
    launcher = launcher_input(options)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.split("\n\n")[0],
                  pipeline_root=options.root if options else None)
    def detection_distillation(
        source: str,
        checkpoint_root: str,
        images: str = "",
        image_size: int = 256,
        ratio: int = 2,
        seed: int = 0,
        kind: str = "fcos",
        teacher_backbone: str = "resnet34",
        student_backbone: str = "resnet18",
        fpn_channels: int = 256,
        teacher_backbone_weights: str = "",
        student_backbone_weights: str = "",
        epochs: int = 0,
        lr: float = 0.0,
        prepare_settings: dict = DEFAULT_SETTINGS["prepare"],
        teacher_settings: dict = DEFAULT_SETTINGS["teacher"],
        afp_settings: dict = DEFAULT_SETTINGS["afp"],
        msad_settings: dict = DEFAULT_SETTINGS["msad"],
        lr_baseline_settings: dict = DEFAULT_SETTINGS["lr_baseline"],
        export_settings: dict = DEFAULT_SETTINGS["export"],
        evaluate_settings: dict = DEFAULT_SETTINGS["evaluate"],
        code_version: str = "",
        rerun_prepare: str = "",
        rerun_teacher: str = "",
        rerun_afp: str = "",
        rerun_msad: str = "",
        rerun_lr_baseline: str = "",
        rerun_export: str = "",
        rerun_evaluate: str = "",
    ) -> Artifact:
        version = source_version(source=source, images=images)
        data = prepare(source=source, images=images, source_version=version.output, image_size=image_size,
                       settings=prepare_settings, code_version=code_version, rerun_token=rerun_prepare)
        common = dict(data=data.outputs["data"], data_fingerprint=data.outputs["Output"], kind=kind,
                      fpn_channels=fpn_channels, ratio=ratio,
                      seed=seed, checkpoint_root=checkpoint_root, code_version=code_version, launcher=launcher,
                      epochs=epochs, lr=lr)
        teacher = train_detector(settings=teacher_settings, view="hr", backbone=teacher_backbone,
                                 weights=teacher_backbone_weights, rerun_token=rerun_teacher, **common)
        afp = train_afp(teacher=teacher.outputs["model"], method="afp", settings=afp_settings,
                        backbone=student_backbone, weights=student_backbone_weights, rerun_token=rerun_afp, **common)
        msad = train_afp(teacher=teacher.outputs["model"], method="msad", settings=msad_settings,
                         backbone=student_backbone, weights=student_backbone_weights, rerun_token=rerun_msad,
                         **common)
        baseline = train_detector(settings=lr_baseline_settings, view="lr", backbone=student_backbone,
                                  weights=student_backbone_weights, rerun_token=rerun_lr_baseline, **common)
        exported = export(data=data.outputs["data"], code_version=code_version, rerun_token=rerun_export,
                          source=afp.outputs["model"], folder="student", settings=export_settings)
        report = evaluate(data=data.outputs["data"], code_version=code_version, rerun_token=rerun_evaluate,
                          teacher=teacher.outputs["model"], afp=afp.outputs["model"], msad=msad.outputs["model"],
                          lr_baseline=baseline.outputs["model"], student_export=exported.outputs["model"],
                          settings=evaluate_settings)
        for task, name in ((data, "prepare-data"), (teacher, "teacher"), (afp, "afp"), (msad, "msad"),
                           (baseline, "lr-baseline"), (exported, "export"), (report, "evaluate")):
            configure_task(task.set_display_name(name), options)
        configure_task(version.set_display_name("source-version"), options, cached=False)
        return report.outputs["summary"]

    return detection_distillation

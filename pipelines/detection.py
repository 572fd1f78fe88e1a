"""The detection pipeline: AFP and MSAD students of a detection teacher, as a DAG table.

    prepare-data (COCO or YOLO) -> teacher (detector, HR) -> afp (AFP: HR assistant + LR student) -> export
                                                          \\-> msad (MSAD: multi-scale teacher + LR student)
                                -> lr-baseline (detector, LR)
    all of them -> evaluate (COCO mAP, GFLOPs, latency, input bytes)

Built like :mod:`pipelines.pixel_distillation` (:mod:`pipelines.dag`). Typed parameters:
``images`` (a COCO JSON's image folder), the letterbox side ``image_size``, ``ratio``,
``seed``, ``kind``, the pyramid's width ``fpn_channels``, the two backbones and where they
start from (``teacher_backbone_weights``, ``student_backbone_weights``: a classification
checkpoint's trunk such as the classification pipeline's teacher, see
:mod:`kd_lib.models.weights`), ``epochs`` and ``lr`` of every training task (0: each task's
settings decide), and per task its ``TASK_settings`` and ``rerun_TASK``.
"""

from pipelines.dag import REQUIRED, UNSET, Pipeline, Task

STUDENT = {"backbone": "student_backbone", "weights": "student_backbone_weights"}

PIPELINE = Pipeline(
    name="detection-distillation",
    description=__doc__.split("\n\n")[0].strip('"'),
    parameters={"source": REQUIRED, "checkpoint_root": REQUIRED, "images": None, "image_size": None, "ratio": 2,
                "seed": None, "kind": None, "teacher_backbone": "resnet34", "student_backbone": None,
                "fpn_channels": None, "teacher_backbone_weights": None, "student_backbone_weights": None,
                "epochs": UNSET, "lr": UNSET, "code_version": ""},
    tasks=(
        Task("prepare-data"),
        Task("teacher", "detector", params={"backbone": "teacher_backbone", "weights": "teacher_backbone_weights"},
             fixed={"view": "hr"}),
        Task("afp", "detection-distill", reads={"teacher": "teacher"}, params=STUDENT, fixed={"method": "afp"}),
        Task("msad", "detection-distill", reads={"teacher": "teacher"}, params=STUDENT, fixed={"method": "msad"}),
        Task("lr-baseline", "detector", params=STUDENT, fixed={"view": "lr"}),
        Task("export", reads={"model": "afp/student"}),
        Task("evaluate", reads={"models.teacher": "teacher", "models.assistant": "afp/assistant",
                                "models.student_afp": "afp/student", "models.msad_teacher": "msad/teacher",
                                "models.student_msad": "msad/student", "models.lr_baseline": "lr-baseline",
                                "exports.student_afp": "export"}, settings={"latency_batch_sizes": [1, 8]}),
    ),
)

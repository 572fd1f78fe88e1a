"""The classification pipeline: Pixel Distillation's teacher, assistant and students, as a DAG table.

    prepare-data -> teacher + lr-baseline -> teacher-gate
    gate passed: teacher -> assistant -> student (TAS: method tas from the assistant) -> export
                 teacher -> student-onestage (one-stage pixel distillation, KD + ISRD, from the teacher)
                 all five models and the export -> evaluate
    otherwise:   teacher + lr-baseline -> evaluate

Everything else comes from the table (:mod:`pipelines.dag`): each task runs one stage of
``components/`` in the image of its role (:mod:`components.image`), with its stage's defaults
except where its line says otherwise. Typed parameters: ``hr_size``, ``ratio``, ``seed``, the
two architectures and where they start from (``teacher_weights`` for the teacher,
``student_weights`` for the assistant, the one-stage student and the LR baseline; the TAS
student starts from the assistant; see :mod:`kd_lib.models.weights`); ``epochs`` and ``lr`` of
every training task, and the two students' methods (0 or '': each task's settings decide);
``min_teacher_margin``; and per task its ``TASK_settings`` and ``rerun_TASK``.

The teacher gate compares the teacher's and the LR baseline's val top-1
(:mod:`components.gate`): with ``min_teacher_margin`` X, the assistant and the
students run only when the teacher beats the baseline by at least X points;
otherwise they show as skipped, and the run ends with the evaluation of the
two models it trained, whose summary carries the gate's message. The default
(-100) lets every teacher through. The pipeline's output is the URI of the
evaluation's summary folder. Caching, resources and pod settings of each
task: :mod:`pipelines.cluster`.
"""

from kd_lib.eval.verdicts import GATE_OFF
from pipelines.dag import REQUIRED, UNSET, Gate, Pipeline, Task

PIPELINE = Pipeline(
    name="pixel-distillation",
    description=__doc__.split("\n\n")[0].strip('"'),
    parameters={"source": REQUIRED, "checkpoint_root": REQUIRED, "hr_size": None, "ratio": None, "seed": None,
                "teacher_arch": None, "student_arch": None, "teacher_weights": None, "student_weights": None,
                "epochs": UNSET, "lr": UNSET, "student_method": UNSET, "onestage_method": UNSET,
                "min_teacher_margin": GATE_OFF, "code_version": ""},
    tasks=(
        Task("prepare-data"),
        Task("teacher", params={"arch": "teacher_arch", "weights": "teacher_weights"}),
        Task("lr-baseline", params={"arch": "student_arch", "weights": "student_weights"}),
        Task("assistant", reads={"teacher": "teacher"}, params={"arch": "student_arch", "weights": "student_weights"},
             gated=True),
        Task("student", reads={"assistant": "assistant"}, params={"arch": "student_arch", "method": "student_method"},
             gated=True),
        Task("student-onestage", "student", reads={"teacher": "teacher"}, settings={"method": "kd+isrd"},
             params={"arch": "student_arch", "weights": "student_weights", "method": "onestage_method"}, gated=True),
        Task("export", reads={"model": "student"}, gated=True),
        Task("evaluate", reads={"models.teacher": "teacher", "models.assistant": "assistant",
                                "models.student": "student", "models.student_onestage": "student-onestage",
                                "models.lr_baseline": "lr-baseline", "exports.student": "export"}, gated=True),
    ),
    gate=Gate("teacher", "lr-baseline"),
)

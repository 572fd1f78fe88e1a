"""The sweep pipeline: which input size and which student architecture, as a DAG table made from the grid.

    prepare-data -> teacher -> assistant-ARCH (each architecture at HR)
                            -> student-ARCH-rR (TAS from assistant-ARCH at ratio R) + lr-baseline-ARCH-rR
    teacher + assistants -> evaluate-hr;  each cell's student + baseline -> evaluate-ARCH-rR
    all the evaluations -> sweep (the fronts, the chosen cell and its export)

One task per cell (architecture, ratio > 1), so that each cell is its own cached task: adding
a ratio or an architecture to a finished sweep trains only the new cells. Ratio 1 is the
assistant itself. Every task runs its stage's defaults (so each LR student trains with its
baseline's schedule and lr), ``arch`` and ``ratio`` fixed by its cell. Typed parameters:
``hr_size``, ``seed``, the teacher's architecture and weights, ``student_weights`` (the
assistants and the baselines), ``epochs`` and ``lr`` of every training task and the
students' ``method`` (0 or '': each task's settings decide), and the budget of the choice
(``keep``, ``max_bytes``, ``max_gflops``, ``max_latency_ms``, ``cost``;
:mod:`components.sweep`).
"""

import re

from pipelines.dag import REQUIRED, UNSET, Pipeline, Task

#: The grid of ``kdp sweep`` and of the compiled ``pipelines/sweep.yaml``.
RATIOS, ARCHS = (1, 2, 4, 8), ("resnet18", "timm:resnet10t")


def slug(arch: str) -> str:
    """An architecture as part of a task name: ``timm:vit_tiny,patch_size=4`` -> ``timm-vit-tiny-patch-size-4``."""
    return re.sub(r"[^a-z0-9]+", "-", arch.lower()).strip("-")


def sweep_pipeline(ratios: tuple[int, ...] = RATIOS, archs: tuple[str, ...] = ARCHS) -> Pipeline:
    """The sweep of ``archs`` x ``ratios`` (checked by :func:`kd_lib.eval.sweep.check_grid`)."""
    student = {"weights": "student_weights"}
    lr_ratios = [ratio for ratio in ratios if ratio > 1]
    tasks = [Task("prepare-data"), Task("teacher", params={"arch": "teacher_arch", "weights": "teacher_weights"})]
    hr_models = {"models.teacher": "teacher"}
    evaluations = {}
    for arch in archs:
        name = slug(arch)
        tasks.append(Task(f"assistant-{name}", "assistant", reads={"teacher": "teacher"}, params=student,
                          fixed={"arch": arch}))
        if 1 in ratios:
            hr_models[f"models.{arch}@1"] = f"assistant-{name}"
        for ratio in lr_ratios:
            cell = {"arch": arch, "ratio": ratio}
            tasks += [Task(f"student-{name}-r{ratio}", "student", reads={"assistant": f"assistant-{name}"},
                           params={"method": "method"}, fixed=cell),
                      Task(f"lr-baseline-{name}-r{ratio}", "lr-baseline", params=student, fixed=cell),
                      Task(f"evaluate-{name}-r{ratio}", "evaluate", fixed={"ratio": ratio},
                           reads={"models.student": f"student-{name}-r{ratio}",
                                  "models.lr_baseline": f"lr-baseline-{name}-r{ratio}"})]
            evaluations[f"evaluations.{arch}@{ratio}"] = f"evaluate-{name}-r{ratio}"
    tasks.append(Task("evaluate-hr", "evaluate", reads=hr_models, fixed={"ratio": 1}))
    tasks.append(Task("sweep", reads={"evaluations.hr": "evaluate-hr", **evaluations}))
    return Pipeline(
        name="resolution-sweep",
        description=__doc__.split("\n\n")[0].strip('"'),
        parameters={"source": REQUIRED, "checkpoint_root": REQUIRED, "hr_size": None, "seed": None,
                    "teacher_arch": None, "teacher_weights": None, "student_weights": None, "epochs": UNSET,
                    "lr": UNSET, "method": UNSET, "keep": None, "max_bytes": None, "max_gflops": None,
                    "max_latency_ms": None, "cost": None, "code_version": ""},
        tasks=tuple(tasks),
    )


#: The sweep of the default grid.
PIPELINE = sweep_pipeline()

"""assistant: model compression, the small architecture at high resolution distilled from the teacher.

Hinton KD: (1 - alpha) CE + alpha T^2 KL (Hinton et al., 2015)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import StagePlan, TrainStageConfig, run_training_stage, started
from components.stage import Stage
from kd_lib.config import check
from kd_lib.distill.methods import DistillSettings, build_distiller
from kd_lib.models.weights import start_classifier


@dataclass
class AssistantConfig(TrainStageConfig):
    """The assistant (Hinton KD at HR) trains at the teacher's lr 0.05. The LR models keep Pixel
    Distillation's 0.01: with ISRD's eta = 50, higher rates make its decoder diverge."""

    lr: float = 0.05
    """the SGD learning rate at the start"""
    teacher: str = ""
    """the teacher stage's output URI"""
    kd_alpha: float = 0.9
    """weight of the KD term; (1 - kd_alpha) weighs the cross-entropy"""
    temperature: float = 4.0
    """softmax temperature T of the KD term"""

    def validate(self) -> None:
        super().validate()
        check(bool(self.teacher), "teacher", "is required: the teacher stage's output URI")
        check(0 <= self.kd_alpha <= 1, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


def run(config: AssistantConfig) -> dict:
    def plan(classes, models):
        teacher, _ = models["teacher"]
        student, report = start_classifier(config.arch, len(classes), config.weights)
        kd = DistillSettings(method="kd", kd_alpha=config.kd_alpha, temperature=config.temperature)
        task = build_distiller(kd, student, teacher, hr_size=config.hr_size, student_input_size=config.hr_size,
                               student_view="hr")
        return StagePlan(task, config.arch, "hr", *started(config.arch, config.weights, report))

    return run_training_stage("assistant", config, {"teacher": config.teacher}, plan)


STAGE = Stage("assistant", AssistantConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

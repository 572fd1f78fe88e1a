"""student: input compression, the small model at low resolution (Pixel Distillation).

``method: tas`` (teacher -> assistant -> student): the student has the
assistant's architecture, starts from the assistant's weights and is distilled
from it: (1 - alpha) CE + alpha KD + beta * MSE(upsampled student features,
assistant features) + eta * ISRD.

``method: isrd`` (one-stage pixel distillation): a freshly initialised student
distilled straight from the HR teacher: (1 - alpha) CE + alpha KD + eta * ISRD.
The feature term needs paired architectures and applies to ``tas`` only.

Defaults: alpha 0.9 and T 4 (the official configs), eta 50 (official, CUB-200
at ratio 4), beta 1 (our choice: the official code has the loss but never
calls it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from components.common import StagePlan, TrainStageConfig, run_training_stage, stage_cli
from kd_lib.config import ConfigError, check
from kd_lib.distill.distiller import Distiller
from kd_lib.models import build_classifier, default_feature_layers


@dataclass
class StudentConfig(TrainStageConfig):
    method: Literal["tas", "isrd"] = "tas"
    assistant: str = ""
    teacher: str = ""
    kd_alpha: float = 0.9
    temperature: float = 4.0
    isrd_weight: float = 50.0
    feature_weight: float = 1.0
    feature_layers: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        source = "assistant" if self.method == "tas" else "teacher"
        other = "teacher" if self.method == "tas" else "assistant"
        check(bool(getattr(self, source)), source, f"is required with method {self.method}")
        check(not getattr(self, other), other, f"is not used with method {self.method}: "
              f"give {source} instead")
        check(0 <= self.kd_alpha <= 1, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.isrd_weight >= 0, "isrd_weight", f"must be >= 0, got {self.isrd_weight}")
        check(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")


def plan_tas(config: StudentConfig, classes: list[str], models: dict) -> StagePlan:
    assistant, meta = models["assistant"]
    if meta["arch"] != config.arch:
        raise ConfigError("arch", f"TAS trains the assistant's architecture at LR: the assistant is "
                          f"{meta['arch']!r}, the config says {config.arch!r}")
    student = build_classifier(config.arch, len(classes))
    student.load_state_dict(assistant.state_dict())
    layers = config.feature_layers or (default_feature_layers(student) if config.feature_weight else [])
    task = Distiller(student, "lr", assistant, kd_alpha=config.kd_alpha, temperature=config.temperature,
                     isrd_weight=config.isrd_weight, hr_size=config.hr_size,
                     student_input_size=config.lr_size, feature_layers=layers,
                     feature_weight=config.feature_weight)
    return StagePlan(task, config.arch, "lr")


def plan_isrd(config: StudentConfig, classes: list[str], models: dict) -> StagePlan:
    teacher, _ = models["teacher"]
    student = build_classifier(config.arch, len(classes))
    task = Distiller(student, "lr", teacher, kd_alpha=config.kd_alpha, temperature=config.temperature,
                     isrd_weight=config.isrd_weight, hr_size=config.hr_size,
                     student_input_size=config.lr_size)
    return StagePlan(task, config.arch, "lr")


def run(config: StudentConfig) -> dict:
    if config.method == "tas":
        upstream, plan = {"assistant": config.assistant}, plan_tas
    else:
        upstream, plan = {"teacher": config.teacher}, plan_isrd
    stage = "student" if config.method == "tas" else "student-onestage"
    return run_training_stage(stage, config, upstream, lambda classes, models: plan(config, classes, models))


def main(argv: list[str] | None = None) -> int:
    return stage_cli(StudentConfig, run, argv, "kdp stage student", __doc__)


if __name__ == "__main__":
    sys.exit(main())

"""student: input compression, the small model at low resolution, distilled.

``method`` picks the loss (see :mod:`kd_lib.distill.methods`): one of
``kd``, ``dkd``, ``fitnet``, ``at``, ``sp``, ``crkd``, ``isrd``, ``feature``,
``tas``, or several joined by ``+`` (``at+isrd``); ``ce`` alone trains the
LR baseline. Where the student starts from and what it learns from:

- ``assistant: URI``: input compression as in Pixel Distillation's TAS. The
  student has the assistant's architecture, starts from its weights and is
  distilled from it (``method: tas`` = ``kd+feature+isrd``). With
  ``start_from_assistant: false`` it starts from ``weights`` instead and is
  only distilled from the assistant: where the LR input is so small that the
  network's feature maps collapse (16 px into a torchvision ResNet: 1x1 from
  ``layer3`` on), weights made for HR inputs are a worse start than random
  ones (docs/demo.md).
- ``teacher: URI``: a freshly initialised student distilled from that HR model
  (the teacher, or the assistant as a same-architecture HR teacher): the KD
  baselines, CRKD, and one-stage pixel distillation (``method: kd+isrd``).
- neither: ``ce`` or ``isrd`` alone, no teacher.

Without an assistant the student starts from ``weights`` (random by default).

Defaults: alpha 0.9 and T 4, eta 50 (Pixel Distillation's official configs),
the TAS feature weight 1 (our choice: the official code has the loss but
never calls it); the other methods' defaults are in
:class:`kd_lib.distill.methods.DistillSettings`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import StagePlan, TrainStageConfig, run_training_stage, started
from components.stage import Stage
from kd_lib.config import ConfigError, check
from kd_lib.distill.methods import DistillSettings, build_distiller
from kd_lib.models.weights import start_classifier


@dataclass
class StudentConfig(TrainStageConfig, DistillSettings):
    assistant: str = ""
    """the assistant's output URI: the student starts from its weights and learns from it"""
    teacher: str = ""
    """an HR model's output URI: a fresh student learns from it"""
    start_from_assistant: bool = True
    """with an assistant: start from its weights (Pixel Distillation's TAS); false: start from weights"""

    def validate(self) -> None:
        TrainStageConfig.validate(self)
        DistillSettings.validate(self)
        check(not (self.assistant and self.teacher), "teacher",
              "give the assistant (start from it and distil from it) or the teacher, not both")
        check(not (self.assistant and self.start_from_assistant and self.weights), "weights",
              "the student starts from the assistant's weights: give weights or the assistant, not both "
              "(or set start_from_assistant: false)")
        if self.needs_assistant:
            check(bool(self.assistant), "assistant", f"is required with method {self.method}: the student "
                  "starts from the assistant's weights")
        elif self.needs_teacher:
            check(bool(self.assistant or self.teacher), "teacher",
                  f"is required with method {self.method!r}: the HR model to distil from")
        else:
            check(not (self.assistant or self.teacher), "teacher" if self.teacher else "assistant",
                  f"is not used with method {self.method!r}, which has no teacher")


def plan(config: StudentConfig, classes: list[str], models: dict) -> StagePlan:
    student, report = start_classifier(config.arch, len(classes), config.weights)
    origin = started(config.arch, config.weights, report)
    teacher = None
    if config.assistant:
        teacher, meta = models["assistant"]
        if config.start_from_assistant:
            if meta["arch"] != config.arch:
                raise ConfigError("arch", f"the student starts from the assistant's weights, so it has the "
                                  f"assistant's architecture {meta['arch']!r}; the config says {config.arch!r}")
            student.load_state_dict(teacher.state_dict())
            origin = (f"assistant ({meta['info'].get('started_from', 'random')})", None)
    elif config.teacher:
        teacher, _ = models["teacher"]
    task = build_distiller(config, student, teacher, hr_size=config.hr_size, student_input_size=config.lr_size,
                           epochs=config.epochs)
    return StagePlan(task, config.arch, "lr", *origin)


def run(config: StudentConfig) -> dict:
    upstream = {name: getattr(config, name) for name in ("assistant", "teacher") if getattr(config, name)}
    return run_training_stage("student", config, upstream, lambda classes, models: plan(config, classes, models))


STAGE = Stage("student", StudentConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

"""teacher: the large model trained with cross-entropy at high resolution."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import StagePlan, TrainStageConfig, run_training_stage, stage_cli
from kd_lib.distill.distiller import Distiller
from kd_lib.models import build_classifier


@dataclass
class TeacherConfig(TrainStageConfig):
    arch: str = "resnet34"


def run(config: TeacherConfig) -> dict:
    def plan(classes, models):
        return StagePlan(Distiller(build_classifier(config.arch, len(classes)), "hr"), config.arch, "hr")

    return run_training_stage("teacher", config, {}, plan)


def main(argv: list[str] | None = None) -> int:
    return stage_cli(TeacherConfig, run, argv, "kdp stage teacher", __doc__)


if __name__ == "__main__":
    sys.exit(main())

"""lr-baseline: the student's architecture trained at low resolution with
cross-entropy alone, the baseline every distilled student is compared with."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import StagePlan, TrainStageConfig, run_training_stage, stage_cli
from kd_lib.distill.distiller import Distiller
from kd_lib.models import build_classifier


@dataclass
class LRBaselineConfig(TrainStageConfig):
    pass


def run(config: LRBaselineConfig) -> dict:
    def plan(classes, models):
        return StagePlan(Distiller(build_classifier(config.arch, len(classes)), "lr"), config.arch, "lr")

    return run_training_stage("lr-baseline", config, {}, plan)


def main(argv: list[str] | None = None) -> int:
    return stage_cli(LRBaselineConfig, run, argv, "kdp stage lr-baseline", __doc__)


if __name__ == "__main__":
    sys.exit(main())

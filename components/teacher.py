"""teacher: the large model trained with cross-entropy at high resolution."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import TrainStageConfig, run_supervised, stage_cli


@dataclass
class TeacherConfig(TrainStageConfig):
    arch: str = "resnet34"


def run(config: TeacherConfig) -> dict:
    return run_supervised("teacher", config, "hr")


def main(argv: list[str] | None = None) -> int:
    return stage_cli(TeacherConfig, run, argv, "kdp stage teacher", __doc__)


if __name__ == "__main__":
    sys.exit(main())

"""teacher: the large model trained with cross-entropy at high resolution."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import TrainStageConfig, run_supervised
from components.stage import Stage


@dataclass
class TeacherConfig(TrainStageConfig):
    """A teacher trained from scratch on real data needs more epochs, and takes a higher lr, than
    the students: 12 epochs at lr 0.05."""

    epochs: int = 12
    """passes over the training split"""
    lr: float = 0.05
    """the SGD learning rate at the start"""
    arch: str = "resnet34"
    """the teacher's architecture: a torchvision model name or timm:NAME,key=value,..."""


def run(config: TeacherConfig) -> dict:
    return run_supervised("teacher", config, "hr")


STAGE = Stage("teacher", TeacherConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

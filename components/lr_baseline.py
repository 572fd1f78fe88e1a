"""lr-baseline: the student's architecture at low resolution with cross-entropy alone.

It is the baseline every distilled student is compared with."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import TrainStageConfig, run_supervised
from components.stage import Stage


@dataclass
class LRBaselineConfig(TrainStageConfig):
    pass


def run(config: LRBaselineConfig) -> dict:
    return run_supervised("lr-baseline", config, "lr")


STAGE = Stage("lr-baseline", LRBaselineConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

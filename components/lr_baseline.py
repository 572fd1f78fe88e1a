"""lr-baseline: the student's architecture trained at low resolution with
cross-entropy alone, the baseline every distilled student is compared with."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import TrainStageConfig, run_supervised, stage_cli


@dataclass
class LRBaselineConfig(TrainStageConfig):
    pass


def run(config: LRBaselineConfig) -> dict:
    return run_supervised("lr-baseline", config, "lr")


def main(argv: list[str] | None = None) -> int:
    return stage_cli(LRBaselineConfig, run, argv, "kdp stage lr-baseline", __doc__)


if __name__ == "__main__":
    sys.exit(main())

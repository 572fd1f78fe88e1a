"""detector: a detector trained with its detection loss alone, on the HR or the LR image.

The detection teacher (``view: hr``, on the letterboxed HR images) and the LR
baseline (``view: lr``, the same images downsampled by ``ratio``, boxes
divided by it) that the distilled students are compared with. The head reads
the usual FPN levels P3-P7.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

from components.common import StageRun, Write, preflight, run_lifecycle
from components.detection_common import (DetectionData, DetectionStageConfig, stage_inputs, start_backbone, train,
                                          write_detector)
from components.stage import Stage
from kd_lib.config import check
from kd_lib.distill.detection import DetectorTraining
from kd_lib.io.publish import Publication
from kd_lib.models.detector_store import DetectorSpec


@dataclass
class DetectorConfig(DetectionStageConfig):
    epochs: int = 24
    """passes over the training split"""
    view: str = "hr"
    """hr: the detection teacher, on the HR images; lr: the LR baseline"""

    def validate(self) -> None:
        super().validate()
        check(self.view in ("hr", "lr"), "view", f"must be hr (the teacher) or lr (the LR baseline), got {self.view!r}")


def run(config: DetectorConfig) -> dict:
    preflight(STAGE.name, config, {"data": config.data})
    data = DetectionData.load(config)
    side = data.image_size if config.view == "hr" else data.image_size // config.ratio
    spec = DetectorSpec(config.kind, config.backbone, len(data.classes), side, fpn_channels=config.fpn_channels)

    def train_detector(run: StageRun) -> Write:
        model = spec.build()
        origin, scales = start_backbone(model, spec, config)
        task = DetectorTraining(model, config.view)
        task.lr_scales = scales
        rows = train(task, data, config, run.checkpoint_dir, f"detector-{config.view}")

        def write(publication: Publication) -> tuple[list[str], dict]:
            files = write_detector(publication.folder, model, spec, data, rows, stage=STAGE.name, view=config.view,
                                   ratio=config.ratio, started_from=origin)
            return files, {"config": asdict(config), "inputs": {"data": config.data}, "final": rows[-1],
                           "started_from": origin}

        return write

    keyed = replace(config, ratio=1) if config.view == "hr" else config  # an HR model ignores the ratio
    return run_lifecycle(STAGE.name, config, stage_inputs(config, data=data.fingerprint), train_detector,
                         key_config=keyed)


STAGE = Stage("detector", DetectorConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

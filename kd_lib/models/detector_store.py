"""A detector's architecture as plain values, and a trained detector on disk.

:class:`DetectorSpec` is everything :func:`~kd_lib.models.detectors.build_detector`
needs; ``model.pt`` holds it with the class names, the state dict and
free-form ``info``, so any stage can rebuild the model without code of the
stage that trained it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch.nn as nn

from kd_lib.errors import ModelKindError
from kd_lib.io import checkpoint
from kd_lib.io.fs import join
from kd_lib.models.detectors import FPN_CHANNELS, build_detector

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class DetectorSpec:
    """Detector kind, backbone, classes, input side, pyramid window and width (see :mod:`kd_lib.models.detectors`)."""

    kind: str
    backbone: str
    num_classes: int
    image_size: int
    first_level: int = 3
    lowest_level: int = 3
    highest_level: int = 7
    fpn_channels: int = FPN_CHANNELS

    def build(self) -> nn.Module:
        return build_detector(self.kind, self.backbone, self.num_classes, image_size=self.image_size,
                              first_level=self.first_level, lowest_level=self.lowest_level,
                              highest_level=self.highest_level, fpn_channels=self.fpn_channels)

    def window(self, first_level: int, image_size: int) -> DetectorSpec:
        """The same architecture (the same parameters) reading another window at another input side."""
        return replace(self, first_level=first_level, image_size=image_size)


def save_detector(out: str, model: nn.Module, spec: DetectorSpec, classes: list[str], **info: Any) -> str:
    uri = join(out, MODEL_FILE)
    checkpoint.save({"spec": asdict(spec), "classes": classes, "input_size": spec.image_size, "info": info,
                     "state_dict": model.state_dict()}, uri)
    return uri


def load_detector(out: str) -> tuple[nn.Module, DetectorSpec, dict[str, Any]]:
    """The detector stored under ``out``, its spec and metadata (eval mode, on CPU)."""
    state = checkpoint.load_published(out, MODEL_FILE)
    if "spec" not in state:
        raise ModelKindError(f"{out} holds a {'classifier' if 'arch' in state else 'model'}, not a detector: "
                             "give the output of a detection stage")
    spec = DetectorSpec(**state["spec"])
    model = spec.build()
    model.load_state_dict(state.pop("state_dict"))
    return model.eval(), spec, state

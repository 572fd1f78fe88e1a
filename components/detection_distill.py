"""detection-distill: an LR detector distilled through an HR model, AFP's aligned assistant or MSAD's teacher.

From the detection teacher (HR, stage ``detector``), in two phases, each
checkpointed and resumable:

``method: afp`` (Pixel Distillation's AFP, our reconstruction)
    1. the assistant: the student's architecture at HR, its head reading
       ``P(3+s)``..``P(7+s)`` (``K = 2^s``), so that its grids and anchors are
       the LR student's; trained with its detection loss plus AFP's dense KD
       from the teacher on the levels both read;
    2. the student: the same parameters at LR, reading ``P3``..``P7``,
       initialized from the assistant and fine-tuned with its detection loss
       plus AFP's dense KD from the assistant on all five aligned levels
       (classification logits at temperature ``afp_temperature``, decoded
       boxes by GIoU, features by MSE; :mod:`kd_lib.losses.afp`).

``method: msad`` (Qi et al., CVPR 2021)
    1. the aligned multi-scale teacher in the student's architecture: HR branch
       ``P(2+s)``..``P(6+s)``, LR branch ``P2``..``P6``, C-FF fusion, trained
       with ``L_HR + L_LR + msad_fused_weight * L_fused`` (the paper's
       teacher); ``msad_teacher_kd: true`` adds AFP's dense KD from the
       detection teacher to its HR branch (our addition, off by default);
    2. the student at LR reading ``P2``..``P6``, initialized from it, with its
       detection loss plus ``min(1, iter / msad_ramp_iters) * msad_alpha T^2
       L1(s/T, t/T)`` per level against the frozen teacher's fused levels.

Publishes the HR model of phase 1 (``assistant/`` with ``method: afp``,
stage ``afp-assistant``; ``teacher/`` with ``method: msad``, the MSAD teacher's
HR branch, stage ``msad-teacher``) and the student (``student/``, stage
``afp-student`` or ``msad-student``) under ``out``, each a detector folder with
its own manifest, and ``manifest.json`` last. Nothing is published until both phases are done;
a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from components.common import StageRun, Write, preflight, publish_on_main, run_lifecycle
from components.detection_common import (DetectionData, DetectionStageConfig, load_upstream_detector, read_rows,
                                          stage_inputs, start_backbone, train, write_detector)
from components.stage import Stage
from kd_lib.config import ConfigError, check
from kd_lib.distill.detection import AFPDistiller, MSADDistiller, MSADTeacher, MSADTeacherTraining
from kd_lib.io.fs import join
from kd_lib.io.manifest import finished_with_key
from kd_lib.io.publish import Publication
from kd_lib.losses.afp import DenseOutputKD
from kd_lib.losses.msad import CrossFeatureFusion, MSADDistillLoss
from kd_lib.models.detector_store import DetectorSpec, load_detector
from kd_lib.models.weights import started_from



def hr_part(method: str) -> str:
    """The folder of the HR model that phase 1 trains: AFP's assistant, or MSAD's teacher."""
    return "assistant" if method == "afp" else "teacher"


@dataclass
class DetectionDistillConfig(DetectionStageConfig):
    epochs: int = 12
    """epochs of phase 2, the student (and of phase 1 unless assistant_epochs says otherwise)"""
    teacher: str = ""
    """the detection teacher's output URI (stage detector, view hr)"""
    method: Literal["afp", "msad"] = "afp"
    """afp: through an aligned HR assistant; msad: through the MSAD teacher"""
    assistant_epochs: int = 0
    """epochs of phase 1, AFP's assistant or MSAD's teacher (0: as many as epochs)"""
    afp_temperature: float = 2.0
    """AFP: temperature of the classification-logit KD"""
    afp_cls_weight: float = 1.0
    """AFP: weight of the classification-logit KD"""
    afp_box_weight: float = 1.0
    """AFP: weight of the GIoU KD of the decoded boxes"""
    afp_feature_weight: float = 1.0
    """AFP: weight of the MSE KD of the pyramid features"""
    msad_fused_weight: float = 0.4
    """MSAD teacher: weight of the fused branch's detection loss"""
    msad_alpha: float = 0.2
    """MSAD student: weight of the L1 KD against the teacher's fused levels"""
    msad_temperature: float = 3.0
    """MSAD student: temperature T of that KD"""
    msad_ramp_iters: int = 500
    """MSAD student: steps over which the KD weight ramps up from 0"""
    msad_teacher_kd: bool = False

    def validate(self) -> None:
        super().validate()
        check(bool(self.teacher), "teacher", "is required: the detection teacher's output URI")
        check(self.method in ("afp", "msad"), "method", f"must be afp or msad, got {self.method!r}")
        check(self.ratio >= 2, "ratio", f"must be 2, 4 or 8 for a low-resolution student, got {self.ratio}")
        check(self.assistant_epochs >= 0, "assistant_epochs", "must be >= 0 (0: as many as epochs)")
        check(self.afp_temperature > 0, "afp_temperature", f"must be > 0, got {self.afp_temperature}")
        check(self.msad_temperature > 0, "msad_temperature", f"must be > 0, got {self.msad_temperature}")
        check(self.msad_ramp_iters >= 0, "msad_ramp_iters", f"must be >= 0, got {self.msad_ramp_iters}")

    def dense_kd(self) -> DenseOutputKD:
        return DenseOutputKD(self.afp_temperature, self.afp_cls_weight, self.afp_box_weight,
                             self.afp_feature_weight)


def aligned_specs(config: DetectionDistillConfig, num_classes: int, hr_size: int) -> tuple[DetectorSpec, DetectorSpec]:
    """The assistant's (HR) and the student's (LR) windows on one architecture (module docstring)."""
    shift = int(math.log2(config.ratio))
    low = 3 if config.method == "afp" else 2
    hr = DetectorSpec(config.kind, config.backbone, num_classes, hr_size, first_level=low + shift,
                      lowest_level=low, highest_level=low + 4 + shift, fpn_channels=config.fpn_channels)
    return hr, hr.window(low, hr_size // config.ratio)


def train_assistant(config: DetectionDistillConfig, data: DetectionData, teacher: torch.nn.Module, spec: DetectorSpec,
                    lr_spec: DetectorSpec, job: StageRun) -> tuple[torch.nn.Module, MSADTeacher | None, list[dict]]:
    """Phase 1, or its result when a run with this key finished it already: the assistant,
    the MSAD teacher around it (``method: msad``) and the phase's metrics rows."""
    folder = join(job.checkpoint_dir, "assistant")
    fusion = CrossFeatureFusion(config.fpn_channels) if config.method == "msad" else None
    if finished_with_key(folder, job.key) is not None:
        assistant, _, meta = load_detector(folder)
        print(f"{STAGE.name}: {config.method} phase 1 already done ({folder})", file=sys.stderr)
        rows = read_rows(folder)
        if fusion is not None:
            fusion.load_state_dict(meta["info"]["fusion"])
    else:
        assistant = spec.build()
        _, scales = start_backbone(assistant, spec, config)
        if fusion is None:
            task = AFPDistiller(assistant, "hr", teacher, config.dense_kd())
        else:
            kd = (teacher, config.dense_kd()) if config.msad_teacher_kd else (None, None)
            task = MSADTeacherTraining(MSADTeacher(assistant, lr_spec.build(), fusion), config.msad_fused_weight, *kd)
        task.lr_scales = scales
        rows = train(task, data, config, join(job.checkpoint_dir, "assistant-train"), f"{config.method} assistant",
                     epochs=config.assistant_epochs or config.epochs)
        extra = {"fusion": fusion.state_dict()} if fusion is not None else {}

        def write() -> dict:
            part = f"{config.method}-{hr_part(config.method)}"
            with Publication(folder, part, job.key) as publication:
                files = write_detector(publication.folder, assistant, spec, data, rows, stage=part,
                                       **extra)
                return publication.commit(files, {"final": rows[-1]})

        publish_on_main(folder, write)
    return assistant, (MSADTeacher(assistant, lr_spec.build(), fusion) if fusion is not None else None), rows


def run(config: DetectionDistillConfig) -> dict:
    preflight(STAGE.name, config, {"data": config.data, "teacher": config.teacher})
    data = DetectionData.load(config)
    teacher, teacher_spec, teacher_fingerprint, _ = load_upstream_detector(config.teacher, "teacher", data.classes)
    if teacher_spec.kind != config.kind:
        raise ConfigError("kind", f"the teacher is a {teacher_spec.kind} and the student a {config.kind}: dense "
                          "distillation pairs their outputs anchor by anchor, so they must be the same kind")
    if teacher_spec.image_size != data.image_size:
        raise ConfigError("teacher", f"the teacher reads {teacher_spec.image_size} px images, the data is "
                          f"{data.image_size} px")
    if config.afp_feature_weight and teacher_spec.fpn_channels != config.fpn_channels and (
            config.method == "afp" or config.msad_teacher_kd):
        raise ConfigError("fpn_channels", f"is {config.fpn_channels} and the teacher's pyramid is "
                          f"{teacher_spec.fpn_channels} channels wide: AFP's feature term compares them level by "
                          "level; give both the same width, or afp_feature_weight 0")
    spec, lr_spec = aligned_specs(config, len(data.classes), data.image_size)

    def train_phases(job: StageRun) -> Write:
        assistant, msad, assistant_rows = train_assistant(config, data, teacher, spec, lr_spec, job)
        student = lr_spec.build()
        student.load_state_dict(assistant.state_dict())
        if msad is None:
            task = AFPDistiller(student, "lr", assistant, config.dense_kd())
        else:
            task = MSADDistiller(student, msad, MSADDistillLoss(config.msad_alpha, config.msad_temperature),
                                 config.msad_ramp_iters)
        rows = train(task, data, config, join(job.checkpoint_dir, "student-train"), f"{config.method} student")

        def write(publication: Publication) -> tuple[list[str], dict]:
            origin, hr = started_from(config.weights), hr_part(config.method)
            parts = ((hr, assistant, spec, assistant_rows, origin),
                     ("student", student, lr_spec, rows, f"{hr} ({origin})"))
            for part, model, model_spec, part_rows, start in parts:
                child = publication.child(part, f"{config.method}-{part}")
                written = write_detector(child.folder, model, model_spec, data, part_rows,
                                         stage=f"{config.method}-{part}", method=config.method, ratio=config.ratio,
                                         started_from=start)
                child.commit(written, {"final": part_rows[-1]})
            return [], {"config": asdict(config), "inputs": {"data": config.data, "teacher": config.teacher},
                        "final": {f"{part}_{k}": v for part, _, _, r, _ in parts for k, v in r[-1].items()}}

        return write

    return run_lifecycle(STAGE.name, config, stage_inputs(config, data=data.fingerprint, teacher=teacher_fingerprint),
                         train_phases)


STAGE = Stage("detection-distill", DetectionDistillConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())

"""How one training step wires student, teacher and losses, for every stage.

The loss of a step is

    L = (1 - alpha) CE(z_s, y) + alpha L_kd(z_s, z_t) + eta L_isrd + beta L_feat

- teacher and LR baseline: no teacher, ``alpha = 0``: cross-entropy alone;
- assistant (model compression): HR student, HR teacher, Hinton KD;
- student, TAS input compression: LR student initialised from the HR
  assistant, KD from it, its intermediate features upsampled to the
  assistant's and matched by MSE (``beta``), and ISRD (``eta``);
- student, one-stage pixel distillation: LR student, HR teacher, KD + ISRD.

(Guo et al., Pixel Distillation, TPAMI 2024; METHODS.md.) Features are taken
by forward hooks for the duration of the step; forwards are never rewritten.
The teacher is frozen and kept in eval mode whatever ``train()`` is called
with, so its BatchNorm statistics never drift.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_lib.losses import ISRDLoss, KDLoss, UpsampledFeatureMSE
from kd_lib.models import FeatureCapture, feature_shapes, input_module_name

View = Literal["hr", "lr"]


class Distiller(nn.Module):
    """``forward(hr, lr, labels) -> (loss, terms)`` for one batch (see the module docstring)."""

    def __init__(self, student: nn.Module, student_view: View, teacher: nn.Module | None = None, *,
                 kd_alpha: float = 0.0, temperature: float = 4.0,
                 isrd_weight: float = 0.0, hr_size: int = 0, student_input_size: int = 0,
                 feature_layers: list[str] | None = None, feature_weight: float = 0.0):
        super().__init__()
        if teacher is None and (kd_alpha or feature_weight):
            raise ValueError("knowledge distillation (kd_alpha, feature_weight) needs a teacher")
        self.student, self.student_view, self.teacher = student, student_view, teacher
        self.kd_alpha = kd_alpha
        self.kd = KDLoss(temperature) if kd_alpha else None
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.isrd_weight, self.isrd, self.input_module = isrd_weight, None, None
        if isrd_weight:
            self.input_module = input_module_name(student)
            shape = feature_shapes(student, [self.input_module], student_input_size)[self.input_module]
            self.isrd = ISRDLoss(shape[0], shape[-1], hr_size)
        self.feature_weight = feature_weight
        self.feature_layers = list(feature_layers or []) if feature_weight else []
        self.feature = UpsampledFeatureMSE() if self.feature_layers else None

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, hr: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student_input = hr if self.student_view == "hr" else lr
        names = ([self.input_module] if self.isrd else []) + self.feature_layers
        with FeatureCapture(self.student, names) as student_features:
            logits = self.student(student_input)
        terms = {"ce": F.cross_entropy(logits, labels)}
        loss = (1 - self.kd_alpha) * terms["ce"]
        if self.teacher is not None:
            with torch.no_grad(), FeatureCapture(self.teacher, self.feature_layers) as teacher_features:
                teacher_logits = self.teacher(hr)
            if self.kd is not None:
                terms["kd"] = self.kd(logits, teacher_logits)
                loss = loss + self.kd_alpha * terms["kd"]
            if self.feature is not None:
                terms["feature"] = self.feature([student_features[n] for n in self.feature_layers],
                                                [teacher_features[n] for n in self.feature_layers])
                loss = loss + self.feature_weight * terms["feature"]
        if self.isrd is not None:
            terms["isrd"] = self.isrd(student_features[self.input_module], hr)
            loss = loss + self.isrd_weight * terms["isrd"]
        return loss, {name: value.detach() for name, value in terms.items()}

    def trainable_state_dict(self) -> dict:
        """Everything that training changes: the student and the ISRD decoder."""
        state = {"student": self.student.state_dict()}
        if self.isrd is not None:
            state["isrd"] = self.isrd.state_dict()
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        if self.isrd is not None:
            self.isrd.load_state_dict(state["isrd"])

"""How one training step wires student, teacher and loss terms, for every stage.

The loss of a step is

    L = (1 - alpha) CE(z_s, y) + sum_i w_i L_i

over the method's terms (:mod:`kd_lib.distill.terms`, chosen by
:mod:`kd_lib.distill.methods`), ``alpha`` the logit-KD weight:

- teacher and LR baseline: no teacher, no terms: cross-entropy alone;
- assistant (model compression): HR student, HR teacher, Hinton KD;
- student (input compression): LR student, HR teacher or assistant, any
  method of :mod:`kd_lib.distill.methods`.

Features are taken by forward hooks for the duration of the step; forwards
are never rewritten. The teacher is frozen and kept in eval mode whatever
``train()`` is called with, so its BatchNorm statistics never drift.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_lib.distill.terms import StepOutputs, Term
from kd_lib.losses import AdversarialLoss
from kd_lib.models import FeatureCapture, classifier_module_name

View = Literal["hr", "lr"]


class TeacherStudentTask(nn.Module):
    """What every training task shares: a ``student``, an optional ``teacher`` frozen and
    kept in eval mode whatever ``train()`` is called with (its BatchNorm statistics never
    drift), and the training progress in epochs, for warm-ups and ramps."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student, self.teacher = student, teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.progress = 0.0
        self.lr_scales: dict[int, float] = {}  # parameter id -> lr factor (fine-tuning), 1 if absent

    def train(self, mode: bool = True) -> TeacherStudentTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_progress(self, epochs: float) -> None:
        """Tell the task how many epochs are done."""
        self.progress = epochs


class Distiller(TeacherStudentTask):
    """``forward(hr, lr, labels) -> (loss, terms)`` for one batch (see the module docstring).

    Args:
        student: the model trained.
        student_view: which image the student sees, ``"hr"`` or ``"lr"``.
        teacher: the frozen model that sees the HR image; needed by every
            term but ISRD.
        terms: the loss terms besides cross-entropy.
        ce_weight: weight of the cross-entropy, ``1 - alpha``.
    """

    #: Every step uses the same parameters: data-parallel training need not look
    #: for unused ones after each forward (:func:`kd_lib.engine.distributed.data_parallel`).
    same_parameters_every_step = True

    def __init__(self, student: nn.Module, student_view: View, teacher: nn.Module | None = None,
                 terms: list[Term] = (), ce_weight: float = 1.0):
        if teacher is None and any(term.needs_teacher for term in terms):
            raise ValueError("these loss terms distil from a teacher: give one")
        super().__init__(student, teacher)
        self.student_view = student_view
        self.terms = nn.ModuleList(terms)
        self.ce_weight = ce_weight
        self.student_layers = list(dict.fromkeys(n for t in terms for n in t.student_layers))
        self.teacher_layers = list(dict.fromkeys(n for t in terms for n in t.teacher_layers))
        embeddings = any(term.needs_embeddings for term in terms)
        self.classifiers = {id(model): classifier_module_name(model) for model in (student, teacher)
                            if embeddings and model is not None}

    def _run(self, model: nn.Module, image: torch.Tensor, layers: list[str]):
        """Logits, the named layers' outputs and, if a term needs it, the classifier's input."""
        classifier = self.classifiers.get(id(model))
        with FeatureCapture(model, layers) as features, \
                FeatureCapture(model, [classifier] if classifier else [], inputs=True) as embedding:
            logits = model(image)
        return logits, features, embedding[classifier] if classifier else None

    def forward(self, hr: torch.Tensor, lr: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student_input = hr if self.student_view == "hr" else lr
        logits, student_features, student_embedding = self._run(self.student, student_input, self.student_layers)
        values = {"ce": F.cross_entropy(logits, labels)}
        loss = self.ce_weight * values["ce"]
        teacher_logits, teacher_features, teacher_embedding = None, {}, None
        if self.teacher is not None and self.terms:
            with torch.no_grad():
                teacher_logits, teacher_features, teacher_embedding = self._run(self.teacher, hr, self.teacher_layers)
        step = StepOutputs(hr, labels, logits, teacher_logits, student_features, teacher_features,
                           student_embedding, teacher_embedding, self.progress)
        for term in self.terms:
            for name, value in term(step).items():
                values[name] = value
                weight = term.weights.get(name, 0.0)
                if weight:
                    loss = loss + weight * value
        return loss, {name: value.detach() for name, value in values.items()}

    def _adversaries(self) -> list[AdversarialLoss]:
        return [m for m in self.modules() if isinstance(m, AdversarialLoss)]

    def optimized_parameters(self) -> list[nn.Parameter]:
        """What the training loop's optimizer updates: everything trainable but the
        adversarial discriminators, which step with their own optimizers."""
        own = {id(p) for adversary in self._adversaries() for p in adversary.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def trainable_state_dict(self) -> dict:
        """Everything that training changes: the student, the terms' modules (ISRD decoder,
        adapters, discriminator) and the discriminators' optimizers."""
        return {"student": self.student.state_dict(), "terms": self.terms.state_dict(),
                "adversaries": [a.optimizer_state_dict() for a in self._adversaries()]}

    def load_trainable_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.terms.load_state_dict(state["terms"])
        for adversary, optimizer_state in zip(self._adversaries(), state["adversaries"], strict=True):
            adversary.load_optimizer_state_dict(optimizer_state)

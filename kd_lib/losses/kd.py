"""Hinton knowledge distillation on logits."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KDLoss(nn.Module):
    """Temperature-scaled KL divergence from the teacher's to the student's softmax.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
    2015; as in Pixel Distillation's official code (gyguo/PixelDistillation,
    ``lib/losses/kd_loss.py``, ``DistillKL``)::

        L_kd = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
             = T^2 / N * sum_n sum_c p_t[n, c] * (log p_t[n, c] - log p_s[n, c])

    averaged over the batch of ``N`` (``batchmean``). The ``T^2`` keeps the
    gradient's scale independent of ``T``. The teacher's logits are detached
    here, so the loss never sends a gradient into the teacher (or into an
    assistant acting as teacher) even when its forward kept a graph.

    Args:
        temperature: ``T`` > 0; Pixel Distillation's default 4.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(N, num_classes)`` student and teacher logits.

        Raises:
            ValueError: the two shapes differ, or the logits are not 2-D.
        """
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(
                "student and teacher logits must both be (N, num_classes) of one shape, got "
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
            )
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return t**2 * kl

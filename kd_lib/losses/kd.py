"""Knowledge distillation on logits: Hinton KD and decoupled KD."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_lib.ops import kd_loss


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

    Computed by :func:`kd_lib.ops.kd_loss` (a fused CUDA kernel on GPUs), in
    float32 for float32, bfloat16 and float16 logits (float64 for float64).

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
            ValueError: the logits are not non-empty floating ``(N, num_classes)``
                of one shape and dtype (:func:`kd_lib.ops.kd_loss` checks).
        """
        return kd_loss(student_logits, teacher_logits, self.temperature)


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation: target-class and non-target-class KD weighted apart.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; computed as in
    the official code (megvii-research/mdistiller,
    ``mdistiller/distillers/DKD.py``, ``dkd_loss``). With ``p = softmax(z / T)``
    and ``y`` the label, the binary distribution ``b = (p_y, sum_{c != y} p_c)``
    and the distribution over the non-target classes
    ``p~ = softmax(z / T - 1000 * onehot(y))``::

        TCKD = T^2 / N * sum_n KL(b_t[n] || b_s[n])
        NCKD = T^2 / N * sum_n KL(p~_t[n] || p~_s[n])
        L_dkd = alpha * TCKD + beta * NCKD

    The ``-1000`` on the target logit (after division by ``T``) drives its
    probability to zero, so ``p~`` is the softmax over the other classes. The
    teacher's logits are detached.

    mdistiller multiplies the loss by the warm-up factor
    ``min(epoch / warmup, 1)`` (warm-up 20 of 240 epochs); this module does
    not, the caller applies it.

    Args:
        alpha: weight of TCKD; mdistiller's default 1.
        beta: weight of NCKD; 2.0 in Pixel Distillation's CUB-200 and
            FGVC-Aircraft configs (mdistiller's CIFAR-100 value is 8).
        temperature: ``T`` > 0; mdistiller's default 4.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 2.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss for ``(N, num_classes)`` logits and ``(N,)`` integer labels.

        Raises:
            ValueError: the logits are not 2-D of one shape, or ``labels`` is
                not ``(N,)``.
        """
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(
                "student and teacher logits must both be (N, num_classes) of one shape, got "
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
            )
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(
                f"labels must be ({student_logits.shape[0]},) for logits of shape "
                f"{tuple(student_logits.shape)}, got {tuple(labels.shape)}"
            )
        t = self.temperature
        n = student_logits.shape[0]
        student = student_logits / t
        teacher = teacher_logits.detach() / t
        target = torch.zeros_like(student, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)

        binary_student = _target_and_rest(F.softmax(student, dim=1), target)
        binary_teacher = _target_and_rest(F.softmax(teacher, dim=1), target)
        tckd = F.kl_div(torch.log(binary_student), binary_teacher, reduction="sum") * t**2 / n

        log_rest_student = F.log_softmax(student - 1000.0 * target, dim=1)
        rest_teacher = F.softmax(teacher - 1000.0 * target, dim=1)
        nckd = F.kl_div(log_rest_student, rest_teacher, reduction="sum") * t**2 / n
        return self.alpha * tckd + self.beta * nckd


def _target_and_rest(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, 2)``: each row's probability of its target class, and the sum over the others."""
    return torch.stack(
        [(probabilities * target).sum(dim=1), (probabilities * ~target).sum(dim=1)], dim=1
    )

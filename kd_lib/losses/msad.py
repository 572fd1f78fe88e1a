"""MSAD: the crossing feature-level fusion of the aligned multi-scale teacher, and its KD loss.

Qi et al., "Multi-Scale Aligned Distillation for Low-Resolution Detection",
CVPR 2021; official code dvlab-research/MSAD (detectron2, FCOS). The teacher
runs one backbone and head on the HR image and on the LR image (``K = 2``);
HR level ``P_s`` and LR level ``P'_{s-1}`` have the same grid and are fused
per image by the C-FF module; the LR student is distilled from the fused
features, level by level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossFeatureFusion(nn.Module):
    """C-FF: a per-image softmax mix of an HR level and the LR level on its grid.

    Known, from the official code: one module shared by all levels::

        z = GAP(concat(P_s, P'_{s-1}))                 (N, 2C)
        w = softmax(W_2 ReLU(W_1 z))                   W_1: 2C -> C/8, W_2: C/8 -> 2, no biases
        fused = w_0 P_s + w_1 P'_{s-1}

    two scalars per image and level, summing to one.

    Args:
        channels: ``C``, the channels of each pyramid level.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 8:
            raise ValueError(f"channels must be >= 8 (the hidden width is channels / 8), got {channels}")
        self.mix = nn.Sequential(nn.Linear(2 * channels, channels // 8, bias=False), nn.ReLU(),
                                 nn.Linear(channels // 8, 2, bias=False))

    def forward(self, hr: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused, weights)`` for ``(N, C, H, W)`` HR and LR maps; ``weights`` is ``(N, 2)``.

        Raises:
            ValueError: the two maps differ in shape.
        """
        if hr.shape != lr.shape or hr.dim() != 4:
            raise ValueError(f"the HR level {tuple(hr.shape)} and the LR level {tuple(lr.shape)} must be "
                             "(N, C, H, W) of one shape: pair P_s of the HR image with P_(s-1) of the LR one")
        pooled = torch.cat([hr, lr], dim=1).mean(dim=(2, 3))
        weights = self.mix(pooled).softmax(dim=1)
        fused = weights[:, 0, None, None, None] * hr + weights[:, 1, None, None, None] * lr
        return fused, weights


class MSADDistillLoss(nn.Module):
    """Per-level feature KD of MSAD's student: ``alpha T^2 L1(s / T, t / T)``, summed over levels.

    Known, from the official code: ``alpha = 0.2``, ``T = 3``, the student's
    LR levels against the teacher's fused levels (detached), ramped in by
    ``min(1, iter / 500)`` (the ramp is the caller's). Our choices: the L1 is
    averaged over the elements of each level, and the levels are summed.

    Args:
        alpha: the weight; 0.2 in the official code.
        temperature: ``T`` > 0; 3 in the official code.
    """

    def __init__(self, alpha: float = 0.2, temperature: float = 3.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature = alpha, temperature

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scalar loss over paired levels.

        Raises:
            ValueError: the lists are empty or differ in length, or a pair differs in shape.
        """
        if len(student) != len(teacher) or not student:
            raise ValueError(f"need the same non-zero number of student and teacher levels, got "
                             f"{len(student)} and {len(teacher)}")
        t = self.temperature
        losses = []
        for index, (s, f) in enumerate(zip(student, teacher)):
            if s.shape != f.shape:
                raise ValueError(f"level {index}: student {tuple(s.shape)} and teacher {tuple(f.shape)} differ")
            losses.append(F.l1_loss(s / t, f.detach() / t))
        return self.alpha * t**2 * torch.stack(losses).sum()

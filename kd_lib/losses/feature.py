"""Feature distillation between an LR student and an HR assistant of one architecture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class UpsampledFeatureMSE(nn.Module):
    """MSE between the student's upsampled features and the assistant's, averaged over layers.

    TAS input-compression stage of Guo et al., Pixel Distillation, TPAMI 2024:
    the official repo's ``icfup_loss`` ("feature distillation loss in input
    compression stage", gyguo/PixelDistillation ``lib/losses/icfup_loss.py``),
    which the released training scripts never call. For ``L`` pairs of
    student features ``s_l`` (LR, ``(N, C_l, h_l, w_l)``) and teacher
    (assistant) features ``t_l`` (HR, ``(N, C_l, H_l, W_l)``)::

        L_feat = 1/L * sum_l mean((up(s_l, (H_l, W_l)) - t_l)^2)

    ``up`` is bilinear interpolation; the teacher features are detached.

    Our choices:

    - Averaging over layers rather than summing (the official function returns
      the per-layer list and leaves the reduction to the caller): the loss's
      scale then does not grow with the number of layers, so its weight
      carries over between layer choices.
    - ``align_corners=False`` (the official code uses ``True``): pixel
      centres are aligned as in the bilinear HR -> LR resize that makes the
      student's input, so an upsampled student cell lands on the HR region
      it was computed from.
    - The target size is the teacher's full ``(H_l, W_l)``; the official code
      assumes square maps.
    """

    def forward(
        self,
        student_features: Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Scalar loss over the paired feature lists.

        Raises:
            ValueError: the lists are empty or differ in length, or a pair is
                not 4-D with the same batch and channel sizes.
        """
        if len(student_features) != len(teacher_features) or not student_features:
            raise ValueError(
                "need the same non-zero number of student and teacher features, got "
                f"{len(student_features)} student and {len(teacher_features)} teacher"
            )
        losses = []
        for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
            if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
                raise ValueError(
                    f"feature pair {index}: student {tuple(student.shape)} and teacher "
                    f"{tuple(teacher.shape)} must be (N, C, H, W) with the same N and C"
                )
            upsampled = F.interpolate(
                student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
            )
            losses.append(F.mse_loss(upsampled, teacher.detach()))
        return torch.stack(losses).mean()

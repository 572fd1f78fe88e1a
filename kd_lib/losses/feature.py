"""Feature distillation: TAS upsampled-feature MSE and the FitNet, AT and SP baselines."""

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


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool two ``(N, C, H, W)`` maps to their common smaller spatial size.

    The map that is larger in a dimension is pooled to the other's size in it,
    so maps that already match come back unchanged. This is the cross-resolution
    rule of RepDistiller's AT (``distiller_zoo/AT.py``), which pools the larger
    of two square maps; taking the smaller size per dimension extends it to
    non-square maps.
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[-2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def _check_feature_lists(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
) -> None:
    """Raise ValueError unless the lists pair up as non-empty, 4-D, one batch size per pair."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            "need the same non-zero number of student and teacher features, got "
            f"{len(student_features)} student and {len(teacher_features)} teacher"
        )
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"feature pair {index}: student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)} must be (N, C, H, W) with the same N"
            )


class HintLoss(nn.Module):
    """FitNet hint loss: MSE between the adapted student feature and the teacher's.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; as in
    RepDistiller (``distiller_zoo/FitNet.py`` for the loss, ``models/util.py``
    ``ConvReg`` for the regressor)::

        L_hint = mean((r(s) - t)^2)

    ``r`` maps the student's ``C_s`` channels to the teacher's ``C_t``, the mean
    runs over batch, channels and pixels, and the teacher feature is detached.
    The loss owns ``r``: give its parameters to the student's optimizer, and
    drop them at deployment.

    Our choices:

    - ``r`` is a 1x1 convolution without bias, BatchNorm or ReLU (RepDistiller's
      ``ConvReg`` adds BatchNorm and ReLU and picks a strided, transposed or
      larger kernel to match spatial sizes).
    - Spatial sizes that differ (an LR student, an HR teacher) are matched by
      :func:`pool_to_smaller` after ``r``, the same rule as
      :class:`AttentionTransferLoss`.

    Args:
        student_channels: ``C_s``.
        teacher_channels: ``C_t``.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(N, C_s, h, w)`` student and ``(N, C_t, H, W)`` teacher features.

        Raises:
            ValueError: a feature is not 4-D, the batch sizes differ, or the
                channels are not the adapter's.
        """
        channels = (self.adapter.in_channels, self.adapter.out_channels)
        if (
            student_feature.dim() != 4
            or teacher_feature.dim() != 4
            or student_feature.shape[0] != teacher_feature.shape[0]
            or (student_feature.shape[1], teacher_feature.shape[1]) != channels
        ):
            raise ValueError(
                f"student {tuple(student_feature.shape)} and teacher "
                f"{tuple(teacher_feature.shape)} must be (N, {channels[0]}, h, w) and "
                f"(N, {channels[1]}, H, W) with the same N"
            )
        student, teacher = pool_to_smaller(self.adapter(student_feature), teacher_feature.detach())
        return F.mse_loss(student, teacher)


class _SummedOverLayers(nn.Module):
    """A loss on pairs of student and teacher features, summed over the pairs
    (RepDistiller's reduction, which its weights assume); teacher features detached."""

    def forward(
        self,
        student_features: Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Scalar loss over the paired feature lists.

        Raises:
            ValueError: the lists are empty or differ in length, or a pair is
                not 4-D with the same batch size.
        """
        _check_feature_lists(student_features, teacher_features)
        return torch.stack([self.pair_loss(student, teacher.detach())
                            for student, teacher in zip(student_features, teacher_features)]).sum()

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AttentionTransferLoss(_SummedOverLayers):
    """Attention transfer: squared distance between L2-normalized spatial attention maps.

    Zagoruyko and Komodakis, "Paying More Attention to Attention", ICLR 2017;
    as in RepDistiller (``distiller_zoo/AT.py``). For ``L`` pairs of features
    ``f`` of shape ``(N, C, H, W)`` (the channel counts of a pair may
    differ), the attention map of one sample is::

        A(f) = mean_c |f_c|^p,     a(f) = A(f) / ||A(f)||_2

    flattened over ``H x W``, and::

        L_at = sum_l mean((a(s_l) - a(t_l))^2)

    the mean running over batch and pixels. The sum over layers is
    RepDistiller's (its weight, beta = 1000, assumes it). The teacher features
    are detached.

    When the spatial sizes of a pair differ (an LR student and an HR
    teacher), ``pool="feature"`` (the default) adaptive-pools the larger
    *feature* to the smaller grid with :func:`pool_to_smaller` and then takes
    the attention map: RepDistiller's and Pixel Distillation's code, whose
    weight 1000 is tuned to it. ``pool="attention"`` (our option) pools the
    larger attention map ``A`` instead, averaging the attention energy of
    each HR region where pooling the feature lets activations of opposite
    sign cancel; its loss is about 1.8x larger at ``K = 4``.

    ``|f|^p`` as in the paper; RepDistiller's ``f^p`` is the same for its
    default ``p = 2``.

    Args:
        p: the exponent ``p`` > 0; 2 in the paper and RepDistiller.
        pool: what is pooled when the sizes differ, ``"feature"`` or ``"attention"``.
    """

    POOLS = ("feature", "attention")

    def __init__(self, p: float = 2.0, pool: str = "feature") -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.p, self.pool = p, pool

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.pool == "feature":
            student_map, teacher_map = map(self._attention, pool_to_smaller(student, teacher))
        else:
            student_map, teacher_map = pool_to_smaller(self._attention(student), self._attention(teacher))
        difference = F.normalize(student_map.flatten(1)) - F.normalize(teacher_map.flatten(1))
        return difference.pow(2).mean()

    def _attention(self, feature: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` map ``mean_c |f_c|^p``."""
        return feature.abs().pow(self.p).mean(dim=1, keepdim=True)


class SimilarityPreservingLoss(_SummedOverLayers):
    """Similarity-preserving KD: match the batch's normalized similarity matrices.

    Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019;
    as in RepDistiller (``distiller_zoo/SP.py``). For ``L`` pairs of features
    flattened per sample to ``F`` of shape ``(N, C * H * W)``, ``G`` is
    ``F F^T`` with each row L2-normalized, and::

        L_sp = sum_l ||G(s_l) - G(t_l)||_F^2 / N^2

    ``G`` is ``N x N`` whatever the channels and spatial sizes, so an LR
    student pairs with an HR teacher without resizing. The sum over layers is
    RepDistiller's. The teacher features are detached.
    """

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        difference = _similarity(student) - _similarity(teacher)
        return difference.pow(2).sum() / student.shape[0] ** 2


def _similarity(feature: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` Gram matrix of the flattened samples, each row L2-normalized."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t())

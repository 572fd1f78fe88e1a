"""Distillation losses.

Logit KD (Hinton KD, DKD), Pixel Distillation's ISRD and TAS feature
distillation, the feature baselines FitNet, AT and SP, and the
cross-resolution KD terms of RKD (embedding alignment, pairwise distances,
MMD, adversarial), and MSAD's cross-feature fusion and feature KD.
"""

from kd_lib.losses.crkd import (
    AdversarialLoss,
    Discriminator,
    EmbeddingAdapter,
    MMDLoss,
    NormalizedEmbeddingLoss,
    PairwiseDistanceLoss,
    gaussian_mmd2,
    mmd2,
)
from kd_lib.losses.feature import (
    AttentionTransferLoss,
    HintLoss,
    SimilarityPreservingLoss,
    UpsampledFeatureMSE,
    pool_to_smaller,
)
from kd_lib.losses.isrd import ISRDLoss
from kd_lib.losses.kd import DKDLoss, KDLoss
from kd_lib.losses.msad import CrossFeatureFusion, MSADDistillLoss

__all__ = [
    "AdversarialLoss",
    "AttentionTransferLoss",
    "CrossFeatureFusion",
    "DKDLoss",
    "Discriminator",
    "EmbeddingAdapter",
    "HintLoss",
    "ISRDLoss",
    "KDLoss",
    "MSADDistillLoss",
    "MMDLoss",
    "NormalizedEmbeddingLoss",
    "PairwiseDistanceLoss",
    "SimilarityPreservingLoss",
    "UpsampledFeatureMSE",
    "gaussian_mmd2",
    "mmd2",
    "pool_to_smaller",
]

"""Distillation losses: logit KD, ISRD, and TAS feature distillation."""

from kd_lib.losses.feature import UpsampledFeatureMSE
from kd_lib.losses.isrd import ISRDLoss
from kd_lib.losses.kd import KDLoss

__all__ = ["ISRDLoss", "KDLoss", "UpsampledFeatureMSE"]

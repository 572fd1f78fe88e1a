"""Backbones, feature capture and the ISRD decoder."""

from kd_lib.models.backbones import (
    available_architectures,
    build_classifier,
    check_architecture,
    classifier_module_name,
    default_feature_layers,
    input_module_name,
)
from kd_lib.models.features import FeatureCapture, feature_shapes
from kd_lib.models.isrd import ISRDDecoder

__all__ = [
    "FeatureCapture",
    "ISRDDecoder",
    "available_architectures",
    "build_classifier",
    "check_architecture",
    "classifier_module_name",
    "default_feature_layers",
    "feature_shapes",
    "input_module_name",
]

"""Classification backbones by name, and the layers distillation reads from them.

Teacher, assistant and student are all torchvision classification models,
built from scratch (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import difflib

import torch.nn as nn
import torchvision

RESNET_FEATURE_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")


def available_architectures() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models`` only)."""
    return torchvision.models.list_models(module=torchvision.models)


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier ``arch`` with ``num_classes`` outputs.

    ResNets and MobileNetV3 end in adaptive average pooling, so they run at any
    input side from 8 px up, which the LR student needs (HR / K with K up to 8
    on 64 px data). Models with a fixed input size (the ViTs) keep it.

    Raises:
        ValueError: ``arch`` is not a torchvision classification model; the
            message lists close matches.
    """
    names = available_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ValueError(
            f"unknown architecture {arch!r} ({hint}); "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def input_module_name(model: nn.Module) -> str:
    """Name of the model's input module: its first ``nn.Conv2d`` in ``named_modules()`` order.

    The output of this module is the ISRD feature (Guo et al., Pixel
    Distillation, TPAMI 2024; official code gyguo/PixelDistillation): for a
    ResNet ``"conv1"``, whose output is taken before BN and ReLU; for
    MobileNetV3 ``"features.0.0"``; for a torchvision ViT ``"conv_proj"``, the
    patch embedding as a ``D x sqrt(N) x sqrt(N)`` map before the class token
    and position embedding.

    Raises:
        ValueError: the model has no ``nn.Conv2d``.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ValueError(
        f"{type(model).__name__} has no nn.Conv2d, so no input module for ISRD"
    )


def default_feature_layers(model: nn.Module) -> list[str]:
    """The intermediate features that TAS pairs between assistant and student.

    For torchvision ResNets (ResNet, ResNeXt, Wide ResNet) the outputs of the
    four stages ``layer1`` .. ``layer4`` (our choice: the stage outputs are
    the features that the usual feature-distillation baselines read, and each
    one differs between HR assistant and LR student only in spatial size).

    Raises:
        ValueError: any other model; its feature layers must be set explicitly.
    """
    if isinstance(model, torchvision.models.ResNet):
        return list(RESNET_FEATURE_LAYERS)
    raise ValueError(
        f"no default feature layers for {type(model).__name__}: set the feature "
        "layers explicitly (module names from model.named_modules())"
    )

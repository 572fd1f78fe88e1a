"""Classification backbones by name, and the layers distillation reads from them.

An architecture is a torchvision classification model name (``resnet18``) or a
timm model with keyword arguments, ``timm:NAME,key=value,...``, for example
``timm:vit_tiny_patch16_224,patch_size=4,img_size=64`` (a ViT-Tiny with 4 px
patches). Models are built randomly initialised; where a model starts from is
a separate ``weights`` setting (:mod:`kd_lib.models.weights`), and
``pretrained=True`` in a timm arch string means ``weights: "timm:"``. The
architecture string alone rebuilds the model, so it is what stage outputs
record.
"""

from __future__ import annotations

import ast
import inspect

import timm
import torch
import torch.nn as nn
import torchvision

from kd_lib.config import ConfigError, check_name

RESNET_FEATURE_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
TIMM_PREFIX = "timm:"


def available_architectures() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models`` only)."""
    return torchvision.models.list_models(module=torchvision.models)


def check_architecture(arch: str, field: str = "arch") -> None:
    """Raise :class:`~kd_lib.config.ConfigError` for ``field`` unless :func:`build_classifier`
    takes the name ``arch``: an unknown name (with its close matches), malformed timm arguments, or
    arguments timm's model does not take (:func:`check_timm_arguments`)."""
    if not arch.startswith(TIMM_PREFIX):
        check_name(arch, available_architectures(), field, "torchvision architecture")
        return
    try:
        name, _ = parse_timm_arch(arch)
    except ValueError as err:
        raise ConfigError(field, str(err)) from None
    check_name(name, timm.list_models(), field, "timm model")
    check_timm_arguments(arch, field)


def check_timm_arguments(arch: str, field: str = "arch") -> None:
    """:class:`~kd_lib.config.ConfigError` for ``field`` unless timm builds ``arch`` (on the meta device:
    no memory, no weights) and every keyword argument whose default in the model's class is a number
    (or a flag) is given a number: a string there would fail only inside training."""
    name, kwargs = parse_timm_arch(arch)
    try:
        with torch.device("meta"):
            model = _create_timm(arch, None)
    except Exception as err:  # timm raises TypeError, ValueError, AssertionError, ... for bad arguments
        raise ConfigError(field, f"{arch!r}: timm cannot build {name} with these arguments: {err}") from None
    declared = inspect.signature(type(model).__init__).parameters
    for key, value in kwargs.items():
        default = declared[key].default if key in declared else None
        if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise ConfigError(field, f"{arch!r}: {key}={value!r} is not a number ({name} takes a "
                              f"{type(default).__name__}, by default {default!r})")


def parse_timm_arch(arch: str) -> tuple[str, dict]:
    """``"timm:NAME,k=v,..."`` -> ``(NAME, {k: v})``; values are Python literals, else strings.

    Raises:
        ValueError: a keyword argument is not ``key=value``.
    """
    name, *pairs = arch[len(TIMM_PREFIX):].split(",")
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"architecture {arch!r}: {pair!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


def build_timm(arch: str, num_classes: int | None, name: str | None = None, **extra) -> nn.Module:
    """timm model ``NAME`` (or ``name``, e.g. ``NAME.TAG``) with ``num_classes`` (None: timm's
    default) and the arch's keyword arguments, plus ``extra`` (timm's ``pretrained`` arguments).

    ``dynamic_img_size=True`` is added for models that take it (the ViTs), so
    one model runs at any input size, its position embedding resampled to the
    patch grid: the HR assistant's weights then initialise the LR student.
    An explicit ``dynamic_img_size`` in the arch string wins. ``pretrained``
    in the arch string is dropped here: the architecture alone builds a random
    model, and :mod:`kd_lib.models.weights` loads the weights it asks for.
    """
    check_architecture(arch)
    return _create_timm(arch, num_classes, name, **extra)


def _create_timm(arch: str, num_classes: int | None, name: str | None = None, **extra) -> nn.Module:
    """:func:`build_timm` without checking ``arch`` first."""
    arch_name, kwargs = parse_timm_arch(arch)
    kwargs.pop("pretrained", None)
    kwargs = {"pretrained": False, **extra, **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "dynamic_img_size" in kwargs:
        return timm.create_model(name or arch_name, **kwargs)
    try:
        return timm.create_model(name or arch_name, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        return timm.create_model(name or arch_name, **kwargs)


def timm_pretrained(arch: str) -> bool:
    """Whether a timm arch string asks for timm's pretrained weights (``pretrained=True``)."""
    return arch.startswith(TIMM_PREFIX) and parse_timm_arch(arch)[1].get("pretrained") is True


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier ``arch`` with ``num_classes`` outputs.

    ``arch`` is a torchvision model name or ``timm:NAME,key=value,...`` (see
    the module docstring). ResNets and MobileNetV3 end in adaptive average
    pooling, so they run at any input side from 8 px up, which the LR student
    needs (HR / K with K up to 8 on 64 px data); timm ViTs run at any multiple
    of their patch size; torchvision's ViTs keep their fixed input size.

    Raises:
        ValueError: ``arch`` is unknown (the message lists close matches), its
            keyword arguments are malformed, or ``num_classes < 1``.
        TypeError: timm rejects a keyword argument.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith(TIMM_PREFIX):
        return build_timm(arch, num_classes)
    check_architecture(arch)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def input_module_name(model: nn.Module) -> str:
    """Name of the model's input module: its first ``nn.Conv2d`` in ``named_modules()`` order.

    The output of this module is the ISRD feature (Guo et al., Pixel
    Distillation, TPAMI 2024; official code gyguo/PixelDistillation): for a
    ResNet ``"conv1"``, whose output is taken before BN and ReLU; for
    MobileNetV3 ``"features.0.0"``; for a ViT (timm ``"patch_embed.proj"``,
    torchvision ``"conv_proj"``) the patch embedding as a
    ``D x sqrt(N) x sqrt(N)`` map before the class token and the position
    embedding.

    Raises:
        ValueError: the model has no ``nn.Conv2d``.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ValueError(
        f"{type(model).__name__} has no nn.Conv2d, so no input module for ISRD"
    )


def classifier_module_name(model: nn.Module) -> str:
    """Name of the model's classifier: its last ``nn.Linear`` in ``named_modules()`` order.

    The classifier's *input* is the embedding that CRKD distils (the pooled
    penultimate feature): ResNet ``"fc"``, timm ViT ``"head"`` (after the class
    token pooling and the final norm), MobileNetV3 ``"classifier.3"``.

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear, so no classifier input to distil")
    return names[-1]


def default_feature_layers(model: nn.Module) -> list[str]:
    """The intermediate features that TAS pairs between assistant and student.

    For ResNets (torchvision's ResNet, ResNeXt, Wide ResNet; timm's, which
    name their stages alike) the outputs of the four stages ``layer1`` .. ``layer4`` (our choice: the stage outputs are
    the features that the usual feature-distillation baselines read, and each
    one differs between HR assistant and LR student only in spatial size).
    For models whose trunk is a ``features`` sequence (torchvision's
    MobileNets, EfficientNets, MNASNet), the same by analogy: the last block
    at each of the four deepest resolutions (strides 4 to 32, found by one
    forward at 224 px).

    Raises:
        ValueError: any other model; its feature layers must be set explicitly.
    """
    if isinstance(model, torchvision.models.ResNet) or all(hasattr(model, name) for name in RESNET_FEATURE_LAYERS):
        return list(RESNET_FEATURE_LAYERS)
    trunk = getattr(model, "features", getattr(model, "layers", None))
    if isinstance(trunk, nn.Sequential):
        prefix = "features" if trunk is getattr(model, "features", None) else "layers"
        sides: dict[int, int] = {}
        x, training = torch.zeros(1, 3, 224, 224), model.training
        model.eval()  # BatchNorm's running statistics stay as they are
        try:
            with torch.no_grad():
                for index, block in enumerate(trunk):
                    x = block(x)
                    sides[x.shape[-1]] = index  # the last block at each side
        finally:
            model.train(training)
        last = [index for side, index in sorted(sides.items(), reverse=True) if 224 // side >= 4][-4:]
        return [f"{prefix}.{index}" for index in last]
    raise ValueError(
        f"no default feature layers for {type(model).__name__}: set the feature "
        "layers explicitly (module names from model.named_modules())"
    )

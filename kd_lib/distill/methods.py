"""Distillation methods by name, and their settings.

``method`` is one name or several joined by ``+``, each adding its terms to
cross-entropy (``ce`` alone: no teacher, no terms)::

    L = (1 - alpha) CE + sum over terms of weight * term

``alpha`` is ``kd_alpha`` when the method has a logit KD term (``kd``,
``crkd``, ``tas``) and 0 otherwise (DKD, like mdistiller, keeps CE at 1).

==========  ==============================================================
``kd``      Hinton KD (alpha 0.9, T 4: Pixel Distillation's defaults)
``dkd``     decoupled KD (alpha 1, beta 8, T 4, 20 warm-up epochs: mdistiller)
``fitnet``  hint MSE on one layer through a 1x1 adapter (weight 100: RepDistiller)
``at``      attention transfer (weight 1000: RepDistiller)
``sp``      similarity-preserving KD (weight 3000: RepDistiller)
``crkd``    RKD's cross-resolution KD: logit KD, normalized-embedding L2,
            pair-wise distances, MMD, adversarial (our reconstruction)
``isrd``    Pixel Distillation's ISRD (eta 50: official CUB-200 config)
``feature`` TAS's upsampled-feature MSE; the layers must pair one to one
``tas``     ``kd+feature+isrd``: Pixel Distillation's input-compression step
==========  ==============================================================

``isrd`` combines with any other method (Pixel Distillation adds it to KD
baselines); at most one of ``kd``, ``dkd``, ``crkd`` and ``tas`` carries the
logit term. Every weight is a field of :class:`DistillSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from kd_lib.config import ConfigError, check
from kd_lib.distill.distiller import Distiller, View
from kd_lib.distill.terms import (
    AttentionTransfer,
    CrossResolutionKD,
    DecoupledKD,
    FitNet,
    ISRD,
    LogitKD,
    SimilarityPreserving,
    Term,
    UpsampledFeatures,
)
from kd_lib.models import classifier_module_name, default_feature_layers, feature_shapes, input_module_name

ALIASES = {"tas": ("kd", "feature", "isrd")}
METHODS = ("ce", "kd", "dkd", "fitnet", "at", "sp", "crkd", "isrd", "feature", "tas")
LOGIT_METHODS = ("kd", "dkd", "crkd", "tas")


@dataclass
class DistillSettings:
    """The method and the weight of every term (see the module docstring)."""

    method: str = "tas"
    kd_alpha: float = 0.9
    temperature: float = 4.0
    isrd_weight: float = 50.0
    feature_weight: float = 1.0
    feature_layers: list[str] = field(default_factory=list)
    fitnet_weight: float = 100.0
    fitnet_layer: str = ""
    at_weight: float = 1000.0
    at_layers: list[str] = field(default_factory=list)
    sp_weight: float = 3000.0
    sp_layers: list[str] = field(default_factory=list)
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: float = 20.0
    crkd_embed_weight: float = 1.0
    crkd_pair_weight: float = 25.0
    crkd_mmd_weight: float = 1.0
    crkd_adv_weight: float = 0.1
    crkd_adv_lr: float = 2e-4

    def validate(self) -> None:
        parts = self.method.split("+")
        for part in parts:
            check(part in METHODS, "method", f"{part!r} is not a method; choose from {list(METHODS)}, "
                  "joined by '+'")
        check(len(set(parts)) == len(parts), "method", f"{self.method!r} names a method twice")
        check(parts == ["ce"] or "ce" not in parts, "method", "ce (cross-entropy alone) combines with nothing")
        logit = [p for p in parts if p in LOGIT_METHODS]
        check(len(logit) <= 1, "method", f"{self.method!r}: {' and '.join(logit)} each carry the logit "
              "term; keep one")
        check(0 <= self.kd_alpha <= 1, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.dkd_warmup >= 0, "dkd_warmup", f"must be >= 0, got {self.dkd_warmup}")
        check(self.crkd_adv_lr > 0, "crkd_adv_lr", f"must be > 0, got {self.crkd_adv_lr}")
        for name in ("isrd_weight", "feature_weight", "fitnet_weight", "at_weight", "sp_weight",
                     "dkd_alpha", "dkd_beta", "crkd_embed_weight", "crkd_pair_weight",
                     "crkd_mmd_weight", "crkd_adv_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")

    @property
    def components(self) -> tuple[str, ...]:
        """The method's parts with aliases expanded: ``"tas+at"`` -> ``("kd", "feature", "isrd", "at")``."""
        parts = []
        for part in self.method.split("+"):
            parts.extend(ALIASES.get(part, (part,)))
        return tuple(p for p in parts if p != "ce")

    @property
    def needs_teacher(self) -> bool:
        return any(p != "isrd" for p in self.components)

    @property
    def logit_alpha(self) -> float:
        """The KD weight ``alpha``; cross-entropy gets ``1 - alpha``."""
        return self.kd_alpha if {"kd", "crkd"} & set(self.components) else 0.0


def _layers(given: list[str], model: nn.Module, field_name: str, pick=slice(None)) -> list[str]:
    if given:
        return list(given)
    try:
        return default_feature_layers(model)[pick]
    except ValueError as err:
        raise ConfigError(field_name, str(err)) from None


def build_terms(settings: DistillSettings, student: nn.Module, teacher: nn.Module | None, *,
                hr_size: int, student_input_size: int) -> list[Term]:
    """The terms of ``settings.method`` for this student and teacher.

    Layer fields left empty take the student's stage outputs (ResNets;
    RepDistiller's choices): ``feature`` and ``at`` all four stages, ``fitnet``
    the second stage, ``sp`` the last one.

    Raises:
        ConfigError: the method needs a teacher and none is given, a layer
            field is needed and has no default, or paired layers differ in
            channels.
    """
    parts = settings.components
    if teacher is None and settings.needs_teacher:
        raise ConfigError("method", f"{settings.method!r} distils from a teacher: give one")
    terms: list[Term] = []
    for part in parts:
        if part == "kd":
            terms.append(LogitKD(settings.kd_alpha, settings.temperature))
        elif part == "dkd":
            terms.append(DecoupledKD(settings.dkd_alpha, settings.dkd_beta, settings.temperature,
                                     settings.dkd_warmup))
        elif part == "isrd":
            name = input_module_name(student)
            shape = feature_shapes(student, [name], student_input_size)[name]
            terms.append(ISRD(settings.isrd_weight, name, shape, hr_size))
        elif part == "feature":
            layers = _layers(settings.feature_layers, student, "feature_layers")
            _check_channels(student, teacher, layers, student_input_size, hr_size, "feature_layers")
            terms.append(UpsampledFeatures(settings.feature_weight, layers))
        elif part == "at":
            terms.append(AttentionTransfer(settings.at_weight, _layers(settings.at_layers, student, "at_layers")))
        elif part == "sp":
            layers = _layers(settings.sp_layers, student, "sp_layers", slice(-1, None))
            terms.append(SimilarityPreserving(settings.sp_weight, layers))
        elif part == "fitnet":
            layer = settings.fitnet_layer or _layers([], student, "fitnet_layer", slice(1, 2))[0]
            terms.append(FitNet(settings.fitnet_weight, layer, _channels(student, [layer], student_input_size)[layer],
                                _channels(teacher, [layer], hr_size)[layer]))
        elif part == "crkd":
            terms.append(LogitKD(settings.kd_alpha, settings.temperature))
            terms.append(CrossResolutionKD(
                _embedding_dim(student), _embedding_dim(teacher),
                embed_weight=settings.crkd_embed_weight, pair_weight=settings.crkd_pair_weight,
                mmd_weight=settings.crkd_mmd_weight, adv_weight=settings.crkd_adv_weight,
                adv_lr=settings.crkd_adv_lr))
    return terms


def _embedding_dim(model: nn.Module) -> int:
    """Width of the embedding that enters the classifier (its ``in_features``)."""
    return dict(model.named_modules())[classifier_module_name(model)].in_features


def _channels(model: nn.Module, layers: list[str], input_size: int) -> dict[str, int]:
    """The channel count of each named layer's output at ``input_size``."""
    return {layer: shape[0] for layer, shape in feature_shapes(model, layers, input_size).items()}


def _check_channels(student: nn.Module, teacher: nn.Module, layers: list[str], student_size: int,
                    teacher_size: int, field_name: str) -> None:
    ours, theirs = _channels(student, layers, student_size), _channels(teacher, layers, teacher_size)
    for layer in layers:
        if ours[layer] != theirs[layer]:
            raise ConfigError(field_name, f"layer {layer!r} has {ours[layer]} channels in the student "
                              f"and {theirs[layer]} in the teacher: this term pairs layers of one "
                              "architecture (TAS: distil from the assistant)")


def build_distiller(settings: DistillSettings, student: nn.Module, teacher: nn.Module | None, *,
                    hr_size: int, student_input_size: int, student_view: View = "lr") -> Distiller:
    """The :class:`Distiller` of ``settings.method`` (see :func:`build_terms`)."""
    terms = build_terms(settings, student, teacher, hr_size=hr_size, student_input_size=student_input_size)
    return Distiller(student, student_view, teacher if settings.needs_teacher else None, terms,
                     ce_weight=1 - settings.logit_alpha)

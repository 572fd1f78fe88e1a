"""Distillation methods by name, and their settings.

``method`` is one name or several joined by ``+``, each adding its terms to
cross-entropy (``ce`` alone: no teacher, no terms)::

    L = (1 - alpha) CE + sum over terms of weight * term

``alpha`` is ``kd_alpha`` when a method with a Hinton KD term (``kd``,
``crkd``, ``tas``) is in the mix, and 0 otherwise (DKD, like mdistiller,
keeps CE at 1).

A method is declared once, where it is built: :func:`method` registers a function
``build(settings, models) -> terms`` with the method's name, its settings (a dataclass
of the fields it alone reads, with their defaults and checks; ``uses``: fields of other
methods it reads too) and what it needs. The build's docstring says what its terms are
(first paragraph) and where they come from (``Source: ...``). :class:`DistillSettings`,
the student's method fields, is made of every registered method's settings; the
``method`` field's help and the table of ``docs/methods.md``
(``python -m kd_lib.distill.methods``) are written from the registry. A new method is
its loss (:mod:`kd_lib.losses`), its term (:mod:`kd_lib.distill.terms`), its settings
and registration here, and its test.

``isrd`` combines with any other method (Pixel Distillation adds it to KD
baselines); at most one of ``kd``, ``dkd``, ``crkd`` and ``tas`` carries the
logit term. Weights (``*_weight``) are never negative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Literal

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


@dataclass
class MethodChoice:
    """The ``method`` field, and what the methods it names need (see the module docstring)."""

    method: str = field(default="tas", metadata={"help": lambda: "the method, or several joined by '+': "
                                                 + ", ".join(METHODS) + " (docs/methods.md says what each is)"})

    def validate(self) -> None:
        methods = self.methods
        names = [part for m in methods for part in (m.parts or (m.name,))]
        check(len(set(names)) == len(names), "method", f"{self.method!r} names a method twice")
        check(names == ["ce"] or "ce" not in names, "method", "ce (cross-entropy alone) combines with nothing")
        logit = [m.name for m in methods if m.logit]
        check(len(logit) <= 1, "method", f"{self.method!r}: {' and '.join(logit)} each carry the logit "
              "term; keep one")
        for spec in fields(self):
            if spec.name.endswith("_weight"):
                check(getattr(self, spec.name) >= 0, spec.name, f"must be >= 0, got {getattr(self, spec.name)}")
        for settings in reversed(type(self).__mro__):  # each method's settings class, in registration order
            if "check" in vars(settings):
                settings.check(self)

    @property
    def methods(self) -> tuple[Method, ...]:
        """The declarations of the methods named in ``method``.

        Raises:
            ConfigError: a name is not a registered method.
        """
        for name in self.method.split("+"):
            check(name in METHODS, "method", f"{name!r} is not a method; choose from {list(METHODS)}, "
                  "joined by '+'")
        return tuple(METHODS[name] for name in self.method.split("+"))

    @property
    def needs_teacher(self) -> bool:
        return any(m.needs_teacher for m in self.methods)

    @property
    def needs_assistant(self) -> bool:
        """Whether the student must start from the assistant's weights (``tas``)."""
        return any(m.from_assistant for m in self.methods)

    @property
    def logit_alpha(self) -> float:
        """The KD weight ``alpha``; cross-entropy gets ``1 - alpha``."""
        return self.kd_alpha if any(m.hinton for m in self.methods) else 0.0

    @property
    def ce_weight(self) -> float:
        """The weight of the cross-entropy, ``1 - alpha``."""
        return 1 - self.logit_alpha


@dataclass(frozen=True)
class Models:
    """What a method's terms are built for: the student, the teacher (or ``None``),
    their input sizes and the run's length in epochs (``None`` when not known)."""

    student: nn.Module
    teacher: nn.Module | None
    hr_size: int
    student_input_size: int
    epochs: float | None = None

    def layers(self, given: list[str], field_name: str, pick: slice = slice(None)) -> list[str]:
        """``given``, or the student's stage outputs (ResNets; RepDistiller's choices) picked by ``pick``."""
        if given:
            return list(given)
        try:
            return default_feature_layers(self.student)[pick]
        except ValueError as err:
            raise ConfigError(field_name, str(err)) from None

    def channels(self, model: nn.Module, layers: list[str], input_size: int) -> dict[str, int]:
        """The channel count of each named layer's output at ``input_size``."""
        return {layer: shape[0] for layer, shape in feature_shapes(model, layers, input_size).items()}

    def same_channels(self, layers: list[str], field_name: str) -> list[str]:
        """``layers``, once checked to have the same channels in student and teacher."""
        ours = self.channels(self.student, layers, self.student_input_size)
        theirs = self.channels(self.teacher, layers, self.hr_size)
        for layer in layers:
            if ours[layer] != theirs[layer]:
                raise ConfigError(field_name, f"layer {layer!r} has {ours[layer]} channels in the student "
                                  f"and {theirs[layer]} in the teacher: this term pairs layers of one "
                                  "architecture (TAS: distil from the assistant)")
        return layers

    def embedding_dim(self, model: nn.Module) -> int:
        """Width of the embedding that enters the classifier (its ``in_features``)."""
        return dict(model.named_modules())[classifier_module_name(model)].in_features


Build = Callable[["DistillSettings", Models], list[Term]]


@dataclass(frozen=True)
class Method:
    """One name of ``method``: how its terms are built and what it needs.

    Attributes:
        name: the name in ``method``.
        build: ``build(settings, models) -> terms``; its docstring says what they are and their source.
        settings_class: the dataclass of the fields only this method reads (None: none).
        settings: the :class:`DistillSettings` fields ``build`` reads (its class's and those it uses).
        logit: carries a logit-distillation term (at most one such method in a mix).
        hinton: carries Hinton KD, so cross-entropy gets ``1 - kd_alpha``.
        needs_teacher: reads the teacher.
        from_assistant: the student starts from the assistant's weights.
        parts: the methods it sums (see :func:`combination`); itself when empty.
    """

    name: str
    build: Build
    settings_class: type | None = None
    settings: tuple[str, ...] = ()
    logit: bool = False
    hinton: bool = False
    needs_teacher: bool = True
    from_assistant: bool = False
    parts: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """What its terms are: the first paragraph of its build's docstring, on one line."""
        return " ".join((self.build.__doc__ or "").strip().split("\n\n")[0].split())

    @property
    def source(self) -> str:
        """Where its terms come from: the ``Source:`` paragraph of its build's docstring."""
        found = (self.build.__doc__ or "").partition("Source:")[2]
        return " ".join(found.strip().split("\n\n")[0].split())


METHODS: dict[str, Method] = {}


def method(name: str, settings: type | None = None, uses: tuple[str, ...] = (), **declaration
           ) -> Callable[[Build], Build]:
    """Register the decorated ``build`` as method ``name``, with the dataclass ``settings`` of the
    fields it alone reads and the fields of other methods it ``uses`` (other fields of :class:`Method`)."""

    def register(build: Build) -> Build:
        own = tuple(spec.name for spec in fields(settings)) if settings is not None else ()
        METHODS[name] = Method(name, build, settings, own + tuple(uses), **declaration)
        return build

    return register


@method("ce", needs_teacher=False)
def _ce(settings: DistillSettings, models: Models) -> list[Term]:
    """none: the LR baseline"""
    return []


@dataclass
class KDSettings:
    kd_alpha: float = 0.9
    """the weight of the logit KD term; CE gets 1 - kd_alpha"""
    temperature: float = 4.0
    """the softmax temperature T of the logit KD terms"""

    def check(self) -> None:
        check(0 <= self.kd_alpha <= 1, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


@method("kd", KDSettings, logit=True, hinton=True)
def _kd(settings: DistillSettings, models: Models) -> list[Term]:
    """Hinton KD, ``a T^2 KL(t/T || s/T)``

    Source: Hinton et al. 2015; alpha 0.9 and T 4 from Pixel Distillation's configs."""
    return [LogitKD(settings.kd_alpha, settings.temperature)]


@dataclass
class DKDSettings:
    dkd_alpha: float = 1.0
    """DKD's weight of target-class KD"""
    dkd_beta: float = 2.0
    """DKD's weight of non-target-class KD"""
    dkd_warmup: float = 20 / 240
    """the share of the run over which DKD ramps in linearly"""

    def check(self) -> None:
        check(self.dkd_alpha >= 0 and self.dkd_beta >= 0, "dkd_alpha" if self.dkd_alpha < 0 else "dkd_beta",
              f"must be >= 0, got {min(self.dkd_alpha, self.dkd_beta)}")
        check(0 <= self.dkd_warmup <= 1, "dkd_warmup", f"must be a fraction of the run in [0, 1], "
              f"got {self.dkd_warmup}")


@method("dkd", DKDSettings, uses=("temperature",), logit=True)
def _dkd(settings: DistillSettings, models: Models) -> list[Term]:
    """decoupled KD, ``alpha TCKD + beta NCKD``, ramped in over the first ``dkd_warmup`` of the run

    Source: Zhao et al. 2022 and mdistiller (alpha 1, T 4, warm-up 20 of 240 epochs); beta 2 from Pixel
    Distillation's CUB/Aircraft configs."""
    if models.epochs is None and settings.dkd_warmup:
        raise ValueError("dkd's warm-up is a fraction of the run: give the run's epochs")
    return [DecoupledKD(settings.dkd_alpha, settings.dkd_beta, settings.temperature,
                        settings.dkd_warmup * (models.epochs or 0))]


@dataclass
class ISRDSettings:
    isrd_weight: float = 50.0
    """eta: the weight of ISRD's L1 between the decoded first-layer feature and the HR image"""


@method("isrd", ISRDSettings, needs_teacher=False)
def _isrd(settings: DistillSettings, models: Models) -> list[Term]:
    """ISRD: the student's first-layer output decoded to the HR image, L1

    Source: Pixel Distillation's code (eta 50: its CUB-200 config)."""
    name = input_module_name(models.student)
    shape = feature_shapes(models.student, [name], models.student_input_size)[name]
    return [ISRD(settings.isrd_weight, name, shape, models.hr_size)]


@dataclass
class FeatureSettings:
    feature_weight: float = 1.0
    """the weight of TAS's upsampled-feature MSE"""
    feature_layers: list[str] = field(default_factory=list)
    """the layers the feature term pairs (empty: a ResNet's four stage outputs)"""


@method("feature", FeatureSettings)
def _feature(settings: DistillSettings, models: Models) -> list[Term]:
    """TAS's feature loss: student features upsampled to the assistant's, MSE; the layers pair one to one

    Source: Pixel Distillation's code, where it is defined but not called (weight 1: our choice)."""
    layers = models.same_channels(models.layers(settings.feature_layers, "feature_layers"), "feature_layers")
    return [UpsampledFeatures(settings.feature_weight, layers)]


@dataclass
class ATSettings:
    at_weight: float = 1000.0
    """the weight of attention transfer (beta)"""
    at_layers: list[str] = field(default_factory=list)
    """the layers attention transfer pairs (empty: a ResNet's four stage outputs)"""
    at_pool: Literal["feature", "attention"] = "feature"
    """feature: pool the larger feature to the smaller grid, then take its attention (Pixel
    Distillation); attention: pool the larger attention map"""

    def check(self) -> None:
        check(self.at_pool in AttentionTransfer.POOLS, "at_pool",
              f"must be one of {list(AttentionTransfer.POOLS)}, got {self.at_pool!r}")


@method("at", ATSettings)
def _at(settings: DistillSettings, models: Models) -> list[Term]:
    """attention transfer on ``at_layers``, the larger feature pooled to the smaller grid first

    Source: Zagoruyko and Komodakis 2017; RepDistiller and Pixel Distillation's code (weight 1000)."""
    return [AttentionTransfer(settings.at_weight, models.layers(settings.at_layers, "at_layers"), settings.at_pool)]


@dataclass
class SPSettings:
    sp_weight: float = 3000.0
    """the weight of similarity-preserving KD (gamma)"""
    sp_layers: list[str] = field(default_factory=list)
    """the layers similarity-preserving KD compares (empty: a ResNet's last stage output)"""


@method("sp", SPSettings)
def _sp(settings: DistillSettings, models: Models) -> list[Term]:
    """similarity-preserving KD, batch Gram matrices of ``sp_layers``

    Source: Tung and Mori 2019; RepDistiller (weight 3000)."""
    return [SimilarityPreserving(settings.sp_weight, models.layers(settings.sp_layers, "sp_layers", slice(-1, None)))]


@dataclass
class FitNetSettings:
    fitnet_weight: float = 100.0
    """the weight of FitNet's hint MSE"""
    fitnet_layer: str = ""
    """the layer FitNet's hint is taken from (empty: a ResNet's second stage output)"""


@method("fitnet", FitNetSettings)
def _fitnet(settings: DistillSettings, models: Models) -> list[Term]:
    """hint MSE of a 1x1-adapted student feature to the teacher's on ``fitnet_layer``

    Source: Romero et al. 2015; RepDistiller (weight 100)."""
    layer = settings.fitnet_layer or models.layers([], "fitnet_layer", slice(1, 2))[0]
    return [FitNet(settings.fitnet_weight, layer,
                   models.channels(models.student, [layer], models.student_input_size)[layer],
                   models.channels(models.teacher, [layer], models.hr_size)[layer])]


@dataclass
class CRKDSettings:
    crkd_embed_weight: float = 1.0
    """CRKD's weight of the L2 between normalized embeddings"""
    crkd_pair_weight: float = 25.0
    """CRKD's weight of the pair-wise distance term"""
    crkd_mmd_weight: float = 1.0
    """CRKD's weight of the multi-bandwidth MMD"""
    crkd_adv_weight: float = 0.1
    """CRKD's weight of the adversarial term"""
    crkd_adv_lr: float = 2e-4
    """the learning rate of CRKD's discriminator"""

    def check(self) -> None:
        check(self.crkd_adv_lr > 0, "crkd_adv_lr", f"must be > 0, got {self.crkd_adv_lr}")


@method("crkd", CRKDSettings, uses=("kd_alpha", "temperature"), logit=True, hinton=True)
def _crkd(settings: DistillSettings, models: Models) -> list[Term]:
    """RKD's cross-resolution KD: logit KD, L2 of normalized embeddings, pair-wise distances,
    multi-bandwidth MMD and an adversarial term (its discriminator steps with its own Adam)

    Source: our reconstruction from RKD's abstract (the terms: kd_lib.distill.terms.CrossResolutionKD)."""
    return _kd(settings, models) + [CrossResolutionKD(
        models.embedding_dim(models.student), models.embedding_dim(models.teacher),
        embed_weight=settings.crkd_embed_weight, pair_weight=settings.crkd_pair_weight,
        mmd_weight=settings.crkd_mmd_weight, adv_weight=settings.crkd_adv_weight, adv_lr=settings.crkd_adv_lr)]


def combination(name: str, parts: tuple[str, ...], doc: str, **declaration) -> None:
    """Register method ``name`` as the sum of the registered ``parts``' terms; ``doc`` is its build's docstring."""
    members = [METHODS[part] for part in parts]

    def build(settings: DistillSettings, models: Models) -> list[Term]:
        return [term for m in members for term in m.build(settings, models)]

    build.__doc__ = doc
    METHODS[name] = Method(
        name, build, settings=tuple(dict.fromkeys(s for m in members for s in m.settings)), parts=parts,
        logit=any(m.logit for m in members), hinton=any(m.hinton for m in members),
        needs_teacher=any(m.needs_teacher for m in members), **declaration)


combination("tas", ("kd", "feature", "isrd"), "``kd+feature+isrd`` from the assistant, whose weights the student "
            "starts from\n\nSource: Pixel Distillation's input-compression step.", from_assistant=True)

#: The method fields of the student: ``method`` and every method's settings (a dataclass takes its bases'
#: fields last base first: ``method``, then each method's in the order they were registered).
DistillSettings = make_dataclass(
    "DistillSettings", [], bases=(*reversed(dict.fromkeys(
        m.settings_class for m in METHODS.values() if m.settings_class is not None)), MethodChoice),
    namespace={"__module__": __name__, "__doc__": "The method and the settings of every method (module docstring)."})


def shown(value) -> str:
    """A default as the table shows it: floats to 4 significant digits, strings quoted."""
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def methods_table() -> str:
    """The methods as the Markdown table of ``docs/methods.md``: name, terms, settings and defaults, source."""
    defaults = DistillSettings()
    rows = ["| method | terms | settings (defaults) | source |", "| --- | --- | --- | --- |"]
    for m in METHODS.values():
        values = ", ".join(f"`{name}` {shown(getattr(defaults, name))}" for name in m.settings) or "none"
        rows.append(f"| `{m.name}` | {m.summary} | {values} | {m.source or '-'} |")
    return "\n".join(rows)


def build_terms(settings: DistillSettings, student: nn.Module, teacher: nn.Module | None, *,
                hr_size: int, student_input_size: int, epochs: float | None = None) -> list[Term]:
    """The terms of ``settings.method`` for this student and teacher.

    Layer fields left empty take the student's stage outputs (ResNets;
    RepDistiller's choices): ``feature`` and ``at`` all four stages, ``fitnet``
    the second stage, ``sp`` the last one. ``epochs``, the run's length,
    scales DKD's warm-up.

    Raises:
        ConfigError: the method needs a teacher and none is given, a layer
            field is needed and has no default, or paired layers differ in
            channels.
    """
    if teacher is None and settings.needs_teacher:
        raise ConfigError("method", f"{settings.method!r} distils from a teacher: give one")
    models = Models(student, teacher, hr_size, student_input_size, epochs)
    return [term for m in settings.methods for term in m.build(settings, models)]


def build_distiller(settings: DistillSettings, student: nn.Module, teacher: nn.Module | None, *,
                    hr_size: int, student_input_size: int, student_view: View = "lr",
                    epochs: float | None = None) -> Distiller:
    """The :class:`Distiller` of ``settings.method`` (see :func:`build_terms`)."""
    terms = build_terms(settings, student, teacher, hr_size=hr_size, student_input_size=student_input_size,
                        epochs=epochs)
    return Distiller(student, student_view, teacher if settings.needs_teacher else None, terms,
                     ce_weight=settings.ce_weight)



if __name__ == "__main__":
    print(methods_table())

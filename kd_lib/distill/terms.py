"""The loss terms a distillation method adds to cross-entropy, one class per method.

A term is an ``nn.Module`` that names the features it reads (outputs of
student or teacher modules, or the embedding that enters the classifier),
and maps one step's :class:`StepOutputs` to named, unweighted loss values;
``weights`` gives the weight of each value in the total loss. Formulas and
sources are in :mod:`kd_lib.losses`; this module only wires them to models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from kd_lib.losses import (
    AdversarialLoss,
    AttentionTransferLoss,
    DKDLoss,
    EmbeddingAdapter,
    HintLoss,
    ISRDLoss,
    KDLoss,
    MMDLoss,
    NormalizedEmbeddingLoss,
    PairwiseDistanceLoss,
    SimilarityPreservingLoss,
    UpsampledFeatureMSE,
)


@dataclass
class StepOutputs:
    """What one training step computed, for the terms to read.

    ``*_features`` map module names to module outputs; ``*_embeddings`` map
    the classifier's name to its input. ``progress`` counts the epochs done,
    fractions included (``step / steps_per_epoch``).
    """

    hr: torch.Tensor
    labels: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    student_features: Mapping[str, torch.Tensor]
    teacher_features: Mapping[str, torch.Tensor]
    student_embedding: torch.Tensor | None
    teacher_embedding: torch.Tensor | None
    progress: float


class Term(nn.Module):
    """Base class: which features a term reads, and the weight of each value it returns."""

    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    needs_teacher: bool = True
    needs_embeddings: bool = False
    weights: dict[str, float]

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LogitKD(Term):
    """Hinton KD on logits, weight ``alpha`` (the cross-entropy then gets ``1 - alpha``)."""

    def __init__(self, alpha: float, temperature: float):
        super().__init__()
        self.loss, self.weights = KDLoss(temperature), {"kd": alpha}

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        return {"kd": self.loss(step.student_logits, step.teacher_logits)}


class DecoupledKD(Term):
    """DKD with mdistiller's linear warm-up: weight ``min(progress / warmup_epochs, 1)``.

    The warm-up weight is applied here, per step (mdistiller steps it per
    epoch: our choice, so that a resumed run and a run of few epochs ramp
    smoothly). ``warmup_epochs = 0`` means no warm-up. The methods set it as a
    fraction of the run (mdistiller's 20 of 240 epochs), so that it completes
    in a short run too.
    """

    def __init__(self, alpha: float, beta: float, temperature: float, warmup_epochs: float):
        super().__init__()
        self.loss, self.warmup, self.weights = DKDLoss(alpha, beta, temperature), warmup_epochs, {"dkd": 1.0}

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        ramp = min(step.progress / self.warmup, 1.0) if self.warmup else 1.0
        return {"dkd": ramp * self.loss(step.student_logits, step.teacher_logits, step.labels)}


class ISRD(Term):
    """ISRD on the student's input-module feature; needs no teacher."""

    needs_teacher = False

    def __init__(self, weight: float, input_module: str, feature_shape: torch.Size, hr_size: int):
        super().__init__()
        self.student_layers, self.weights = (input_module,), {"isrd": weight}
        self.loss = ISRDLoss(feature_shape[0], tuple(feature_shape[-2:]), hr_size)

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        return {"isrd": self.loss(step.student_features[self.student_layers[0]], step.hr)}


class _PairedLayers(Term):
    """A term on the same named layers of student and teacher."""

    def __init__(self, name: str, weight: float, layers: list[str], loss: nn.Module):
        super().__init__()
        self.name, self.loss, self.weights = name, loss, {name: weight}
        self.student_layers = self.teacher_layers = tuple(layers)

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        return {self.name: self.loss([step.student_features[n] for n in self.student_layers],
                                     [step.teacher_features[n] for n in self.teacher_layers])}


class UpsampledFeatures(_PairedLayers):
    """TAS input compression: student features upsampled to the assistant's, MSE."""

    def __init__(self, weight: float, layers: list[str]):
        super().__init__("feature", weight, layers, UpsampledFeatureMSE())


class AttentionTransfer(_PairedLayers):
    """AT on the named layers; ``pool`` says what is pooled when the sizes differ
    (:class:`~kd_lib.losses.AttentionTransferLoss`)."""

    POOLS = AttentionTransferLoss.POOLS

    def __init__(self, weight: float, layers: list[str], pool: str = "feature"):
        super().__init__("at", weight, layers, AttentionTransferLoss(pool=pool))


class SimilarityPreserving(_PairedLayers):
    """SP on the named layers."""

    def __init__(self, weight: float, layers: list[str]):
        super().__init__("sp", weight, layers, SimilarityPreservingLoss())


class FitNet(Term):
    """FitNet hint on one layer, through a 1x1 adapter from student to teacher channels."""

    def __init__(self, weight: float, layer: str, student_channels: int, teacher_channels: int):
        super().__init__()
        self.student_layers = self.teacher_layers = (layer,)
        self.loss, self.weights = HintLoss(student_channels, teacher_channels), {"fitnet": weight}

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        layer = self.student_layers[0]
        return {"fitnet": self.loss(step.student_features[layer], step.teacher_features[layer])}


class CrossResolutionKD(Term):
    """RKD's CRKD terms on the embeddings (our reconstruction, METHODS.md "RKD").

    - ``embed``: L2 between the L2-normalized teacher HR embedding and the
      student LR embedding, the student's through a linear adapter when the
      widths differ (with the logit KD term, the resolution-aware loss);
    - ``pair``: relational distance loss on the raw embeddings;
    - ``mmd``: multi-bandwidth Gaussian MMD^2 between the adapted student
      embeddings and the teacher's;
    - ``adv``: the non-saturating generator loss of a discriminator that tells
      teacher HR embeddings from adapted student LR ones. In training mode each
      forward first takes one step of the discriminator with its own
      optimizer on the detached batch, then the generator loss runs through
      the updated discriminator (alternating updates, Goodfellow et al. 2014).

    The MMD and the discriminator read the *normalized* embeddings, as the
    ``embed`` term does (our choice): they then compare the embeddings'
    directions, not their scale, which differs between two networks.
    """

    needs_embeddings = True

    def __init__(self, student_dim: int, teacher_dim: int, *, embed_weight: float, pair_weight: float,
                 mmd_weight: float, adv_weight: float, adv_lr: float):
        super().__init__()
        self.adapter = EmbeddingAdapter(student_dim, teacher_dim)
        self.embed, self.pair, self.mmd = NormalizedEmbeddingLoss(), PairwiseDistanceLoss(), MMDLoss()
        self.adversary = AdversarialLoss(teacher_dim, lr=adv_lr) if adv_weight else None
        self.weights = {"embed": embed_weight, "pair": pair_weight, "mmd": mmd_weight, "adv": adv_weight}

    def forward(self, step: StepOutputs) -> dict[str, torch.Tensor]:
        student, teacher = step.student_embedding, step.teacher_embedding.detach()
        adapted = self.adapter(student)
        fake = nn.functional.normalize(adapted, dim=1)
        real = nn.functional.normalize(teacher, dim=1)
        values = {"embed": self.embed(adapted, teacher), "pair": self.pair(student, teacher),
                  "mmd": self.mmd(fake, real)}
        if self.adversary is not None:
            if self.training:
                values["discriminator"] = self.adversary.discriminator_step(real, fake)
            values["adv"] = self.adversary(fake)
        return values

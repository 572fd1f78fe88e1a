"""AFP's dense distillation of a detector's aligned outputs (Pixel Distillation, our reconstruction).

METHODS.md, "AFP": once the assistant's levels and anchors line up one to one
with the student's, the student learns from the assistant's classification
logits (KD with temperature), its boxes (on the decoded boxes) and its
features (MSE on the aligned levels). The inputs are already paired: anchor
``a`` of the student and of the teacher cover the same image region.

RetinaNet and FCOS classify with one sigmoid per class, so the logit term is
the Bernoulli KL per anchor and class at temperature ``T``::

    p = sigmoid(t / T),  q = sigmoid(s / T)
    L_cls = T^2 * sum_{a,c} [p log(p / q) + (1 - p) log((1 - p) / (1 - q))] / max(1, sum_a w_a)
    L_box = sum_a w_a * (1 - GIoU(b_s, b_t)) / max(eps, sum_a w_a)   (a: teacher boxes of non-zero area)
    L_feat = mean over levels of MSE(f_s, f_t)

with ``w_a = max_c sigmoid(t_ac)`` the teacher's confidence that anchor ``a``
holds an object. Our choices, where the abstract says nothing:

- the logit and box terms are normalized by the teacher's soft count of
  objects, ``sum_a w_a``, as the detectors' focal loss is by the number of
  foreground anchors, so the terms do not vanish among thousands of
  background anchors;
- boxes are weighted by ``w_a``: the box a teacher regresses at a background
  anchor carries no information;
- anchors where the teacher's box has no area (FCOS's ReLU'd distances can be
  0) are left out of the box term: GIoU is undefined there, and torchvision's
  gives a loss of 1 and a gradient of ``1 / eps`` even on identical boxes;
- GIoU (not L1) on the decoded boxes, since it is scale-free: the teacher's HR
  boxes divided by ``K`` and the student's LR boxes are compared in the
  student's pixels;
- FCOS's centre-ness output is not distilled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

EPS = 1e-6


def sigmoid_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2`` times the Bernoulli KL ``KL(sigmoid(t/T) || sigmoid(s/T))``, elementwise."""
    p = torch.sigmoid(teacher_logits / temperature)
    cross = F.binary_cross_entropy_with_logits(student_logits / temperature, p, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits / temperature, p, reduction="none")
    return temperature**2 * (cross - entropy)


class DenseOutputKD(nn.Module):
    """The three AFP terms on paired anchors and levels (see the module docstring).

    ``forward`` takes logits ``(N, A, C)``, decoded boxes ``(N, A, 4)`` in
    the student's pixels, and the lists of paired feature maps, and returns
    the weighted terms ``{"afp_cls", "afp_box", "afp_feature"}`` (a term of
    weight 0 is left out).
    """

    def __init__(self, temperature: float = 2.0, cls_weight: float = 1.0, box_weight: float = 1.0,
                 feature_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.weights = {"afp_cls": cls_weight, "afp_box": box_weight, "afp_feature": feature_weight}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, student_boxes: Tensor,
                teacher_boxes: Tensor, student_features: list[Tensor], teacher_features: list[Tensor]
                ) -> dict[str, Tensor]:
        if student_logits.shape != teacher_logits.shape or student_boxes.shape != teacher_boxes.shape:
            raise ValueError(f"unpaired outputs: logits {tuple(student_logits.shape)} vs "
                             f"{tuple(teacher_logits.shape)}, boxes {tuple(student_boxes.shape)} vs "
                             f"{tuple(teacher_boxes.shape)}")
        teacher_logits, teacher_boxes = teacher_logits.detach(), teacher_boxes.detach()
        confidence = torch.sigmoid(teacher_logits).amax(dim=-1)
        terms = {}
        if self.weights["afp_cls"]:
            kl = sigmoid_kd(student_logits, teacher_logits, self.temperature)
            terms["afp_cls"] = kl.sum() / confidence.sum().clamp(min=1.0)
        if self.weights["afp_box"]:
            kept = (teacher_boxes[..., 2:] > teacher_boxes[..., :2]).all(dim=-1).reshape(-1)
            weight = confidence.reshape(-1)[kept]
            giou = generalized_box_iou_loss(student_boxes.reshape(-1, 4)[kept], teacher_boxes.reshape(-1, 4)[kept],
                                            eps=1e-7)
            terms["afp_box"] = (weight * giou).sum() / weight.sum().clamp(min=EPS)
        if self.weights["afp_feature"]:
            if len(student_features) != len(teacher_features) or not student_features:
                raise ValueError(f"{len(student_features)} student and {len(teacher_features)} teacher "
                                 "feature levels: they must pair one to one")
            terms["afp_feature"] = torch.stack([F.mse_loss(s, t.detach()) for s, t in
                                                zip(student_features, teacher_features)]).mean()
        return {name: self.weights[name] * value for name, value in terms.items()}

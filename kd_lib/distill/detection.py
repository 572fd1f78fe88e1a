"""Training tasks for detectors: supervised, AFP's dense distillation, and MSAD.

Every task has the interface of the training loop (:func:`kd_lib.engine.loop.fit`):
``forward(hr, lr, targets) -> (loss, terms)`` with ``targets`` the HR boxes
(``{"boxes", "labels"}`` per image), a ``student`` (the detector that is
validated and published), ``optimized_parameters``, ``set_progress`` and
``trainable_state_dict``. The student sees ``hr`` or ``lr``; its targets are
the HR boxes times its side over the HR side (divided by ``K`` on LR).

A detector is run through its own torchvision modules (``transform``,
``backbone``, ``head``, ``anchor_generator``, ``compute_loss``) by
:func:`dense_forward`, which returns what torchvision's ``forward`` keeps to
itself: the pyramid levels the head read, the dense head outputs and the
anchors, beside the detection losses. A frozen teacher is kept in eval mode
(its BatchNorm statistics never move) and out of the optimizer, and is never
part of what is published.

- :class:`DetectorTraining`: the detection loss alone (teacher, LR baseline).
- :class:`AFPDistiller`: the detection loss plus AFP's dense distillation
  (:class:`~kd_lib.losses.afp.DenseOutputKD`) on the levels where teacher and
  student have the same grid. For the HR assistant from the HR teacher these
  are the levels both read (same level, same anchors); for the LR student from
  the HR assistant, every level (the assistant's window is shifted by
  ``log2 K``; :mod:`kd_lib.models.detectors`).
- :class:`MSADTeacher` and :class:`MSADTeacherTraining`: MSAD's aligned
  multi-scale teacher, ``L_HR + L_LR + 0.4 L_fused``.
- :class:`MSADDistiller`: the LR student with MSAD's feature KD against the
  fused levels, ramped in by ``min(1, iter / ramp_iters)``; the iteration
  count is a buffer, so it is checkpointed and a resumed run ramps on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from kd_lib.distill.distiller import TeacherStudentTask, View
from kd_lib.losses.afp import DenseOutputKD
from kd_lib.losses.msad import CrossFeatureFusion, MSADDistillLoss

Targets = list[dict[str, Tensor]]


@dataclass
class DenseOutputs:
    """One detector pass: the levels its head read, its dense outputs, anchors and losses."""

    images: ImageList
    features: list[Tensor]
    head: dict[str, Tensor]
    anchors: list[Tensor]
    losses: dict[str, Tensor]

    def level_sizes(self) -> list[int]:
        """Anchors per level (``H * W * A``), in the order of the dense outputs."""
        cells = [f.shape[-2] * f.shape[-1] for f in self.features]
        per_cell = self.head["cls_logits"].shape[1] // sum(cells)
        return [c * per_cell for c in cells]


def scale_targets(targets: Targets, factor: float) -> Targets:
    """The targets with their boxes multiplied by ``factor`` (HR boxes onto an LR image)."""
    return [{**t, "boxes": t["boxes"] * factor} for t in targets]


def dense_forward(detector: nn.Module, images: Tensor, targets: Targets | None = None,
                  features: list[Tensor] | None = None) -> DenseOutputs:
    """Run ``detector`` on ``images`` (N, 3, H, W) in [0, 1]; losses when ``targets`` are given.

    ``features`` replaces the detector's own pyramid levels (MSAD's fused
    levels); the anchors are those of the detector's window on ``images``.
    """
    image_list, targets = detector.transform(list(images), targets)
    if features is None:
        features = _levels(detector, image_list)
    head = detector.head(features)
    anchors = detector.anchor_generator(image_list, features)
    losses = {}
    if targets is not None:
        if isinstance(detector, FCOS):
            losses = detector.compute_loss(targets, head, anchors, [f.shape[-2] * f.shape[-1] for f in features])
        else:
            losses = detector.compute_loss(targets, head, anchors)
    return DenseOutputs(image_list, features, head, anchors, losses)


def _levels(detector: nn.Module, image_list: ImageList) -> list[Tensor]:
    return list(detector.backbone(image_list.tensors).values())


def pyramid_levels(detector: nn.Module, images: Tensor) -> list[Tensor]:
    """The pyramid levels ``detector``'s head reads on ``images`` (N, 3, H, W) in [0, 1], without
    running the head: what a feature-only teacher needs."""
    return _levels(detector, detector.transform(list(images))[0])


def decode_boxes(detector: nn.Module, outputs: DenseOutputs) -> Tensor:
    """The dense box predictions ``(N, A, 4)`` decoded on the anchors, in input pixels."""
    deltas = outputs.head["bbox_regression"]
    decode = detector.box_coder.decode if isinstance(detector, FCOS) else detector.box_coder.decode_single
    return torch.stack([decode(d, a) for d, a in zip(deltas, outputs.anchors)])


def aligned_levels(student: DenseOutputs, teacher: DenseOutputs, size_ranges: bool = False
                   ) -> list[tuple[int, int]]:
    """``(student level, teacher level)`` index pairs whose grids and anchors are the same.

    A level pairs with the teacher level of its grid whose anchors, scaled by
    the ratio of the input sides, have its anchors' size: on a small image the
    top levels are all 1x1, and only the anchor size tells them apart.

    ``size_ranges``: the detectors give each level the objects of a size range
    (FCOS: ``4a`` to ``8a`` for points of size ``a``), open below on the first
    level of the window and above on the last. Two levels with the same
    anchors then agree on their objects only if both or neither are first, and
    both or neither are last; other pairs are left out, since their targets
    contradict each other (an HR assistant's first level ``P4`` holds the
    small objects that a teacher reading from ``P3`` puts on ``P3``, and
    labels background on its ``P4``).

    Raises:
        ValueError: no level pairs, or paired levels differ in anchors per cell.
    """
    s_sizes, t_sizes = student.level_sizes(), teacher.level_sizes()
    scale = student.images.tensors.shape[-1] / teacher.images.tensors.shape[-1]
    s_extents, t_extents = _anchor_extents(student), _anchor_extents(teacher) * scale
    pairs = []
    for i, f in enumerate(student.features):
        same_grid = [j for j, g in enumerate(teacher.features) if g.shape[-2:] == f.shape[-2:]]
        for j in same_grid:
            if s_sizes[i] != t_sizes[j]:
                raise ValueError(f"student level {i} has {s_sizes[i]} anchors and teacher level {j} {t_sizes[j]}: "
                                 "both must be the same detector kind")
        same_anchors = [j for j in same_grid if torch.allclose(s_extents[i], t_extents[j], rtol=1e-3, atol=0)]
        if size_ranges:
            ends = lambda k, count: (k == 0, k == count - 1)  # noqa: E731
            same_anchors = [j for j in same_anchors if ends(i, len(student.features)) == ends(j, len(teacher.features))]
        if same_anchors:
            pairs.append((i, same_anchors[0]))
    if not pairs:
        raise ValueError(f"no pyramid level of the student (grids {[tuple(f.shape[-2:]) for f in student.features]})"
                         f" has the grid and anchors of a teacher level (grids "
                         f"{[tuple(f.shape[-2:]) for f in teacher.features]}): the windows are not aligned")
    return pairs


def _anchor_extents(outputs: DenseOutputs) -> Tensor:
    """Per level, the width and height of its first anchor ``(levels, 2)`` (the cell anchors of a level)."""
    firsts = [level[0] for level in outputs.anchors[0].split(outputs.level_sizes())]
    return torch.stack([a[2:] - a[:2] for a in firsts])


def _select(dense: Tensor, sizes: list[int], levels: list[int]) -> Tensor:
    parts = dense.split(sizes, dim=1)
    return torch.cat([parts[level] for level in levels], dim=1)


class DetectorTraining(TeacherStudentTask):
    """A detector trained with its own detection loss on one view (the base of every task)."""

    def __init__(self, student: nn.Module, view: View, teacher: nn.Module | None = None):
        super().__init__(student, teacher)
        self.view = view

    def optimized_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """Everything but the frozen teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not fit this task: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def forward(self, hr: Tensor, lr: Tensor, targets: Targets) -> tuple[Tensor, dict[str, Tensor]]:
        images = hr if self.view == "hr" else lr
        outputs = dense_forward(self.student, images, scale_targets(targets, images.shape[-1] / hr.shape[-1]))
        terms = {**outputs.losses, **self.distill(hr, lr, targets, outputs)}
        loss = torch.stack(list(terms.values())).sum()
        return loss, {name: value.detach() for name, value in terms.items()}

    def distill(self, hr: Tensor, lr: Tensor, targets: Targets, outputs: DenseOutputs) -> dict[str, Tensor]:
        """Loss terms beside the student's detection loss: none here."""
        return {}


def afp_terms(kd: DenseOutputKD, student: nn.Module, student_out: DenseOutputs, teacher: nn.Module,
              teacher_out: DenseOutputs) -> dict[str, Tensor]:
    """AFP's dense KD of ``student_out`` from ``teacher_out`` on their aligned levels (for FCOS, those
    whose size ranges agree: :func:`aligned_levels`).

    The teacher's boxes are mapped into the student's pixels by the ratio of
    the two input sides.
    """
    pairs = aligned_levels(student_out, teacher_out, size_ranges=isinstance(student, FCOS))
    s_levels, t_levels = [i for i, _ in pairs], [j for _, j in pairs]
    s_sizes, t_sizes = student_out.level_sizes(), teacher_out.level_sizes()
    scale = student_out.images.tensors.shape[-1] / teacher_out.images.tensors.shape[-1]
    return kd(_select(student_out.head["cls_logits"], s_sizes, s_levels),
              _select(teacher_out.head["cls_logits"], t_sizes, t_levels),
              _select(decode_boxes(student, student_out), s_sizes, s_levels),
              _select(decode_boxes(teacher, teacher_out), t_sizes, t_levels) * scale,
              [student_out.features[i] for i in s_levels], [teacher_out.features[j] for j in t_levels])


class AFPDistiller(DetectorTraining):
    """The student's detection loss plus AFP's dense KD from a frozen HR teacher on aligned levels."""

    def __init__(self, student: nn.Module, view: View, teacher: nn.Module, kd: DenseOutputKD):
        super().__init__(student, view, teacher)
        self.kd = kd

    def distill(self, hr, lr, targets, outputs):
        with torch.no_grad():
            teacher_out = dense_forward(self.teacher, hr)
        return afp_terms(self.kd, self.student, outputs, self.teacher, teacher_out)


class MSADTeacher(nn.Module):
    """MSAD's aligned multi-scale teacher: one pyramid and head read on HR and on LR, and C-FF.

    ``hr`` reads ``P(2+s)``..``P(6+s)`` of the HR image and ``lr`` the levels
    ``P2``..``P6`` of the LR image (``K = 2^s``; ``s = 1`` is MSAD's P3-P7 and
    P2-P6), so HR level ``P_l`` and LR level ``P_(l-s)`` share a grid. ``lr``
    shares every parameter with ``hr``; only its window, anchors and input size
    differ. Ratio 4 (``s = 2``) is our extension of the paper's ``K = 2``.
    """

    def __init__(self, hr: nn.Module, lr: nn.Module, fusion: CrossFeatureFusion):
        super().__init__()
        lr.backbone.pyramid, lr.head = hr.backbone.pyramid, hr.head
        self.hr, self.lr, self.fusion = hr, lr, fusion

    def fuse(self, hr_features: list[Tensor], lr_features: list[Tensor]) -> list[Tensor]:
        return [self.fusion(h, low)[0] for h, low in zip(hr_features, lr_features, strict=True)]

    def fused_features(self, hr: Tensor, lr: Tensor) -> list[Tensor]:
        """The fused levels for a batch (what the MSAD student imitates)."""
        return self.fuse(pyramid_levels(self.hr, hr), pyramid_levels(self.lr, lr))


class MSADTeacherTraining(DetectorTraining):
    """Trains an :class:`MSADTeacher`: ``L_HR + L_LR + fused_weight * L_fused`` (0.4 in MSAD).

    The HR branch is the ``student`` of the loop (validated and published).
    Without ``teacher`` and ``kd`` (the default) this is MSAD's teacher as in
    the paper, trained with its own detection losses only. Given a frozen
    detection ``teacher`` and ``kd``, its HR branch also gets AFP's dense KD
    from it on their shared levels (our addition, off unless asked).
    """

    def __init__(self, msad: MSADTeacher, fused_weight: float = 0.4, teacher: nn.Module | None = None,
                 kd: DenseOutputKD | None = None):
        super().__init__(msad.hr, "hr", teacher)
        self.msad, self.fused_weight, self.kd = msad, fused_weight, kd

    def distill(self, hr, lr, targets, outputs):
        lr_out = dense_forward(self.msad.lr, lr, scale_targets(targets, lr.shape[-1] / hr.shape[-1]))
        fused = self.msad.fuse(outputs.features, lr_out.features)
        fused_out = dense_forward(self.student, hr, targets, features=fused)
        terms = {**{f"lr_{k}": v for k, v in lr_out.losses.items()},
                 **{f"fused_{k}": self.fused_weight * v for k, v in fused_out.losses.items()}}
        if self.teacher is not None and self.kd is not None:
            with torch.no_grad():
                teacher_out = dense_forward(self.teacher, hr)
            terms.update(afp_terms(self.kd, self.student, outputs, self.teacher, teacher_out))
        return terms


class MSADDistiller(DetectorTraining):
    """The LR student's detection loss plus ``min(1, iter / ramp_iters) * MSAD KD`` on fused levels."""

    def __init__(self, student: nn.Module, teacher: MSADTeacher, kd: MSADDistillLoss, ramp_iters: int = 500):
        super().__init__(student, "lr", teacher)
        if ramp_iters < 0:
            raise ValueError(f"ramp_iters must be >= 0, got {ramp_iters}")
        self.kd, self.ramp_iters = kd, ramp_iters
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def ramp(self) -> torch.Tensor | float:
        """The KD weight now, ``min(1, iteration / ramp_iters)``: a tensor on the buffer's device (no
        host synchronisation), or 1 without a ramp."""
        return (self.iteration / self.ramp_iters).clamp(max=1.0) if self.ramp_iters else 1.0

    def distill(self, hr, lr, targets, outputs):
        with torch.no_grad():
            fused = self.teacher.fused_features(hr, lr)
        weight = self.ramp()
        if self.training:
            self.iteration += 1
        return {"msad_kd": weight * self.kd(outputs.features, fused)}

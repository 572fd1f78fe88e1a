"""The detection tasks: level pairing through the dense passes, frozen teachers, MSAD's teacher and ramp."""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kd_lib.distill.detection import (
    AFPDistiller,
    DenseOutputs,
    DetectorTraining,
    MSADDistiller,
    MSADTeacher,
    MSADTeacherTraining,
    afp_terms,
    aligned_levels,
    decode_boxes,
    dense_forward,
    scale_targets,
)
from kd_lib.losses.afp import DenseOutputKD
from kd_lib.losses.msad import CrossFeatureFusion, MSADDistillLoss
from kd_lib.models.detector_store import DetectorSpec
from kd_lib.models.detectors import FPN_CHANNELS

HR = 64
CLASSES = 3


def afp_pair(kind: str, ratio: int, hr: int = HR):
    """The AFP assistant (HR, P(3+s)..P(7+s)) and the LR student (P3..P7) on one parameter set."""
    shift = int(math.log2(ratio))
    spec = DetectorSpec(kind, "resnet18", CLASSES, hr, first_level=3 + shift, lowest_level=3,
                        highest_level=7 + shift)
    assistant, student = spec.build(), spec.window(3, hr // ratio).build()
    student.load_state_dict(assistant.state_dict())
    return assistant, student


def msad_teacher(kind: str, ratio: int = 2, hr: int = HR) -> tuple[MSADTeacher, DetectorSpec]:
    """MSAD's teacher (HR branch P(2+s)..P(6+s), LR branch P2..P6) and the LR branch's spec."""
    shift = int(math.log2(ratio))
    spec = DetectorSpec(kind, "resnet18", CLASSES, hr, first_level=2 + shift, lowest_level=2,
                        highest_level=6 + shift)
    lr_spec = spec.window(2, hr // ratio)
    return MSADTeacher(spec.build(), lr_spec.build(), CrossFeatureFusion(FPN_CHANNELS)), lr_spec


def batch(ratio: int = 2, hr: int = HR, seed: int = 0):
    """Two HR images, their LR views and boxes in HR pixels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, hr, hr, generator=generator)
    lr = F.interpolate(images, scale_factor=1 / ratio, mode="bilinear", antialias=True, align_corners=False)
    s = hr / 128  # the boxes are written for a 128 px image
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 72.0, 96.0], [60.0, 4.0, 120.0, 50.0]]) * s,
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[20.0, 30.0, 100.0, 110.0]]) * s, "labels": torch.tensor([0])}]
    return images, lr, targets


def torchvision_losses(model: torch.nn.Module, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The detector's own training losses, from torchvision's forward in training mode with
    BatchNorm on its running statistics: a reference that does not go through ``dense_forward``."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        with torch.no_grad():
            return model(list(images), targets)
    finally:
        model.eval()


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(losses.values())).sum()


# --- alignment through the dense passes --------------------------------------------------


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
@pytest.mark.parametrize("ratio", [2, 4])
def test_afp_assistant_and_student_outputs_pair_level_by_level(kind, ratio):
    torch.manual_seed(0)
    assistant, student = afp_pair(kind, ratio)
    teacher = DetectorSpec(kind, "resnet18", CLASSES, HR).build().eval()
    hr, lr, _ = batch(ratio)
    with torch.no_grad():
        a_out, s_out = dense_forward(assistant.eval(), hr), dense_forward(student.eval(), lr)
        t_out = dense_forward(teacher, hr)
    assert aligned_levels(s_out, a_out) == aligned_levels(s_out, a_out, size_ranges=True) == [(i, i) for i in range(5)]
    shift = int(math.log2(ratio))
    # the assistant's P(3+s+i) is the teacher's P(3+s+i): the levels both read, no others
    assert aligned_levels(a_out, t_out) == [(i, i + shift) for i in range(5 - shift)]
    # by FCOS's size ranges, the assistant's first level takes the objects the teacher puts below it, and the
    # teacher's last level those the assistant puts above it: those two pairs contradict each other
    assert aligned_levels(a_out, t_out, size_ranges=True) == [(i, i + shift) for i in range(1, 4 - shift)]
    assert a_out.level_sizes() == s_out.level_sizes()
    torch.testing.assert_close(a_out.anchors[0] / ratio, s_out.anchors[0], rtol=0, atol=1e-4)
    # the same regression deltas decode to the same regions, K times larger on the HR image
    same_deltas = DenseOutputs(s_out.images, s_out.features,
                               {**s_out.head, "bbox_regression": a_out.head["bbox_regression"]}, s_out.anchors, {})
    torch.testing.assert_close(decode_boxes(assistant, a_out) / ratio, decode_boxes(student, same_deltas),
                               rtol=1e-4, atol=1e-4)


def test_levels_of_another_detector_kind_do_not_pair():
    torch.manual_seed(0)
    fcos = DetectorSpec("fcos", "resnet18", CLASSES, HR).build().eval()
    retinanet = DetectorSpec("retinanet", "resnet18", CLASSES, HR).build().eval()
    hr, _, _ = batch()
    with torch.no_grad():
        f_out, r_out = dense_forward(fcos, hr), dense_forward(retinanet, hr)
    with pytest.raises(ValueError, match="same detector kind"):
        aligned_levels(f_out, r_out)


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_dense_kd_of_a_detector_from_itself_is_zero(kind):
    torch.manual_seed(0)
    model = DetectorSpec(kind, "resnet18", CLASSES, HR).build().eval()
    teacher = copy.deepcopy(model)
    hr, _, _ = batch()
    with torch.no_grad():
        terms = afp_terms(DenseOutputKD(), model, dense_forward(model, hr), teacher, dense_forward(teacher, hr))
    assert set(terms) == {"afp_cls", "afp_box", "afp_feature"}
    for name, value in terms.items():
        assert abs(value.item()) < 1e-5, (name, value.item())


# --- frozen teachers -----------------------------------------------------------------


def assert_teacher_frozen_and_student_trained(task, teacher, student, ratio):
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    task.train()
    params = task.optimized_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for step in range(2):
        hr, lr, targets = batch(ratio, seed=step)
        loss, terms = task(hr, lr, targets)
        assert torch.isfinite(loss) and len(terms) > 1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not any(m.training for m in teacher.modules())
    assert student.training
    assert any("running_mean" in k for k in teacher_state)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # parameters and batch-norm statistics
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in params}
    assert all(p.grad is None for p in teacher.parameters())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_state[k])]
    assert any(k.startswith("head.") for k in changed) and any("running_mean" in k for k in changed)
    state = task.trainable_state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("student.") for k in state)


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_afp_distiller_trains_the_student_and_leaves_the_teacher_frozen(kind):
    torch.manual_seed(0)
    assistant, student = afp_pair(kind, 2)
    task = AFPDistiller(student, "lr", assistant, DenseOutputKD())
    assert_teacher_frozen_and_student_trained(task, assistant, student, 2)


def test_msad_distiller_trains_the_student_and_leaves_the_teacher_frozen():
    torch.manual_seed(0)
    msad, lr_spec = msad_teacher("fcos")
    student = lr_spec.build()
    student.load_state_dict(msad.hr.state_dict())
    task = MSADDistiller(student, msad, MSADDistillLoss(), ramp_iters=1)
    assert any(k.startswith("fusion.") for k in msad.state_dict())  # C-FF is part of the frozen teacher
    assert_teacher_frozen_and_student_trained(task, msad, student, 2)


# --- MSAD's teacher ------------------------------------------------------------------


def test_msad_teacher_branches_share_the_pyramid_and_the_head():
    msad, _ = msad_teacher("fcos")
    assert msad.lr.backbone.pyramid is msad.hr.backbone.pyramid and msad.lr.head is msad.hr.head
    hr_params, lr_params = list(msad.hr.parameters()), list(msad.lr.parameters())
    assert len(hr_params) == len(lr_params) and all(a is b for a, b in zip(hr_params, lr_params))
    assert (msad.hr.backbone.first_level, msad.lr.backbone.first_level) == (3, 2)
    fused_count = sum(p.numel() for p in msad.fusion.parameters())
    assert sum(p.numel() for p in msad.parameters()) == sum(p.numel() for p in hr_params) + fused_count


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_msad_teacher_training_adds_lr_and_weighted_fused_losses(kind):
    torch.manual_seed(0)
    msad, _ = msad_teacher(kind)
    task = MSADTeacherTraining(msad).eval()  # eval: the recomputation below reads the same statistics
    hr, lr, targets = batch()
    loss, terms = task(hr, lr, targets)
    halved = [{**t, "boxes": t["boxes"] / 2} for t in targets]
    with torch.no_grad():
        hr_levels = list(msad.hr.backbone(msad.hr.transform(list(hr))[0].tensors).values())
        lr_levels = list(msad.lr.backbone(msad.lr.transform(list(lr))[0].tensors).values())
        fused = OrderedDict((str(i), msad.fusion(h, low)[0]) for i, (h, low) in enumerate(zip(hr_levels, lr_levels)))
    expected = {"hr": torchvision_losses(msad.hr, hr, targets), "lr": torchvision_losses(msad.lr, lr, halved)}
    with mock.patch.object(msad.hr.backbone, "forward", return_value=fused):  # the head reads the fused levels
        expected["fused"] = torchvision_losses(msad.hr, hr, targets)
    names = set(expected["hr"])
    assert set(terms) == names | {f"lr_{n}" for n in names} | {f"fused_{n}" for n in names}
    for name in names:
        torch.testing.assert_close(terms[name], expected["hr"][name])
        torch.testing.assert_close(terms[f"lr_{name}"], expected["lr"][name])
        torch.testing.assert_close(terms[f"fused_{name}"], 0.4 * expected["fused"][name])
    torch.testing.assert_close(loss.detach(), total(terms))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in msad.fusion.parameters())


# --- MSAD's ramp ---------------------------------------------------------------------


def msad_task(msad, lr_spec, ramp_iters=4):
    torch.manual_seed(1)
    student = lr_spec.build()
    return MSADDistiller(student, msad, MSADDistillLoss(), ramp_iters=ramp_iters)


def test_msad_kd_ramps_in_over_training_steps_and_resumes_from_a_checkpoint():
    torch.manual_seed(0)
    msad, lr_spec = msad_teacher("fcos")
    task = msad_task(msad, lr_spec)
    hr, lr, targets = batch()
    task.train()
    with torch.no_grad():
        unramped = MSADDistillLoss()(dense_forward(task.student, lr).features, msad.fused_features(hr, lr))
    assert unramped.item() > 0
    for step in range(6):
        with torch.no_grad():
            _, terms = task(hr, lr, targets)
        if step == 0:
            assert terms["msad_kd"].item() == 0.0
        torch.testing.assert_close(terms["msad_kd"], min(1.0, step / 4) * unramped)
        assert task.iteration.item() == step + 1
        if step == 1:
            task.eval()
            with torch.no_grad():
                _, eval_terms = task(hr, lr, targets)
            assert task.iteration.item() == 2  # an evaluation pass is no training step
            torch.testing.assert_close(eval_terms["msad_kd"].item() / 0.5, MSADDistillLoss()(
                dense_forward(task.student, lr).features, msad.fused_features(hr, lr)).item(), rtol=1e-4, atol=0)
            buffer = io.BytesIO()
            torch.save(task.trainable_state_dict(), buffer)
            task.train()
    state = torch.load(io.BytesIO(buffer.getvalue()))
    assert state["iteration"].item() == 2 and not any(k.startswith("teacher.") for k in state)
    resumed = msad_task(msad, lr_spec)
    resumed.load_trainable_state_dict(state)
    assert resumed.iteration.item() == 2
    resumed.train()
    with torch.no_grad():
        _, terms = resumed(hr, lr, targets)
    torch.testing.assert_close(terms["msad_kd"], 0.5 * unramped)
    assert resumed.iteration.item() == 3


# --- the student's targets ---------------------------------------------------------


@pytest.mark.parametrize("kind, view, ratio", [("fcos", "lr", 2), ("retinanet", "lr", 4), ("fcos", "hr", 2)])
def test_detector_training_scales_the_hr_boxes_onto_its_view(kind, view, ratio):
    torch.manual_seed(0)
    side = HR if view == "hr" else HR // ratio
    model = DetectorSpec(kind, "resnet18", CLASSES, side).build()
    task = DetectorTraining(model, view).eval()
    hr, lr, targets = batch(ratio)
    images, factor = (hr, 1.0) if view == "hr" else (lr, 1 / ratio)
    loss, terms = task(hr, lr, targets)
    expected = torchvision_losses(model, images, [{**t, "boxes": t["boxes"] * factor} for t in targets])
    unscaled = torchvision_losses(model, images, targets)
    assert set(terms) == set(expected)
    torch.testing.assert_close(loss.detach(), total(expected))
    if view == "lr":
        assert not torch.allclose(total(unscaled), total(expected), rtol=1e-3)

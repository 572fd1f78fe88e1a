"""AFP's dense output KD (logits, decoded boxes, features) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lib.losses.afp import DenseOutputKD, sigmoid_kd


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bernoulli_kd(s: float, t: float, temperature: float) -> float:
    """T^2 KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T))), in plain floats."""
    p, q = sigmoid(t / temperature), sigmoid(s / temperature)
    return temperature**2 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))


# --- sigmoid_kd ----------------------------------------------------------------


@pytest.mark.parametrize("s, t, temperature, expected", [
    # p = sigmoid(1) = 0.731059, q = sigmoid(0.25) = 0.562177:
    # 4 * (0.731059 ln(0.731059 / 0.562177) + 0.268941 ln(0.268941 / 0.437823)) = 0.243887
    (0.5, 2.0, 2.0, 0.2438867),
    # p = sigmoid(3) = 0.952574, q = sigmoid(-1) = 0.268941:
    # 0.952574 ln(0.952574 / 0.268941) + 0.047426 ln(0.047426 / 0.731059) = 1.074971
    (-1.0, 3.0, 1.0, 1.0749708),
    # p = sigmoid(-0.125) = 0.468791, q = sigmoid(0.375) = 0.592667: 16 * KL = 0.498063
    (1.5, -0.5, 4.0, 0.4980626),
])
def test_sigmoid_kd_is_t2_times_the_bernoulli_kl(s, t, temperature, expected):
    assert bernoulli_kd(s, t, temperature) == pytest.approx(expected, rel=1e-6)
    value = sigmoid_kd(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), temperature)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_kd_is_elementwise_zero_on_equal_logits_and_positive_elsewhere():
    grid = torch.linspace(-6, 6, 13)
    s, t = torch.meshgrid(grid, grid, indexing="ij")
    kd = sigmoid_kd(s, t, 2.0)
    assert kd.shape == (13, 13)
    assert torch.all(kd.diagonal().abs() < 1e-6)
    off_diagonal = ~torch.eye(13, dtype=torch.bool)
    assert torch.all(kd[off_diagonal] > 0)
    assert kd[0, 12].item() == pytest.approx(bernoulli_kd(-6.0, 6.0, 2.0), rel=1e-4)


def test_sigmoid_kd_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sigmoid_kd(a, b, 1.5), (s, t))


# --- DenseOutputKD -----------------------------------------------------------

# One image, three anchors, two classes.
STUDENT_LOGITS = [[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]
# Anchor 0: the same box (GIoU 1, loss 0). Anchor 1: [0, 0, 2, 2] holds [0, 0, 1, 1]: IoU = 1/4 and the hull
# is the union, GIoU = 1/4, loss 3/4. Anchor 2: [0, 0, 1, 1] and [2, 0, 3, 1] are disjoint: IoU 0,
# union 2, hull [0, 0, 3, 1] of area 3, GIoU = -(3 - 2) / 3, loss 4/3.
STUDENT_BOXES = [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]]
TEACHER_BOXES = [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]]
GIOU_LOSSES = [0.0, 0.75, 4.0 / 3.0]


def outputs(teacher_logits, requires_grad=False):
    tensors = [torch.tensor([STUDENT_LOGITS]), torch.tensor([teacher_logits]), torch.tensor([STUDENT_BOXES]),
               torch.tensor([TEACHER_BOXES]), [torch.zeros(1, 2, 2, 2), torch.full((1, 2, 1, 1), 3.0)],
               [torch.ones(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]]
    if requires_grad:
        for t in [*tensors[:4], *tensors[4], *tensors[5]]:
            t.requires_grad_(True)
    return tensors


def hand_terms(teacher_logits, temperature):
    kl = sum(bernoulli_kd(s, t, temperature) for s_row, t_row in zip(STUDENT_LOGITS, teacher_logits)
             for s, t in zip(s_row, t_row))
    w = [max(sigmoid(t) for t in row) for row in teacher_logits]
    return {"afp_cls": kl / max(1.0, sum(w)),
            "afp_box": sum(wa * g for wa, g in zip(w, GIOU_LOSSES)) / sum(w),
            # level 1: (0 - 1)^2 = 1; level 2: (3 - 1)^2 = 4; mean over levels 2.5
            "afp_feature": 2.5}


@pytest.mark.parametrize("teacher_logits", [
    [[2.0, -1.0], [0.0, 1.0], [-2.0, -3.0]],  # w = 0.881, 0.731, 0.119: soft count 1.731 > 1
    [[-3.0, -4.0], [-5.0, -3.0], [-3.0, -3.0]],  # w = 0.047 each: the logit term is divided by 1
])
def test_dense_kd_terms_match_the_hand_values(teacher_logits):
    terms = DenseOutputKD(temperature=2.0)(*outputs(teacher_logits))
    expected = hand_terms(teacher_logits, 2.0)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_dense_kd_box_term_is_zero_on_identical_boxes():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    corners = torch.rand(2, 5, 2) * 10
    boxes = torch.cat([corners, corners + 1 + torch.rand(2, 5, 2) * 5], dim=-1)
    kd = DenseOutputKD(cls_weight=0, feature_weight=0)
    terms = kd(student_logits, teacher_logits, boxes, boxes.clone(), [], [])
    assert set(terms) == {"afp_box"} and abs(terms["afp_box"].item()) < 1e-5


def test_dense_kd_weights_scale_the_terms_and_zero_leaves_a_term_out():
    teacher_logits = [[2.0, -1.0], [0.0, 1.0], [-2.0, -3.0]]
    expected = hand_terms(teacher_logits, 3.0)
    terms = DenseOutputKD(temperature=3.0, cls_weight=2.0, box_weight=0.5, feature_weight=0.0)(*outputs(teacher_logits))
    assert set(terms) == {"afp_cls", "afp_box"}
    assert terms["afp_cls"].item() == pytest.approx(2.0 * expected["afp_cls"], rel=1e-5)
    assert terms["afp_box"].item() == pytest.approx(0.5 * expected["afp_box"], rel=1e-5)
    only_features = DenseOutputKD(cls_weight=0.0, box_weight=0.0, feature_weight=3.0)(*outputs(teacher_logits))
    assert set(only_features) == {"afp_feature"}
    assert only_features["afp_feature"].item() == pytest.approx(3.0 * 2.5)


def test_dense_kd_sends_no_gradient_to_the_teacher():
    s_logits, t_logits, s_boxes, t_boxes, s_feats, t_feats = outputs([[2.0, -1.0], [0.0, 1.0], [-2.0, -3.0]],
                                                                     requires_grad=True)
    terms = DenseOutputKD()(s_logits, t_logits, s_boxes, t_boxes, s_feats, t_feats)
    torch.stack(list(terms.values())).sum().backward()
    assert all(t.grad is None for t in (t_logits, t_boxes, *t_feats))
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in (s_logits, s_boxes, *s_feats))


def test_dense_kd_rejects_unpaired_outputs():
    kd = DenseOutputKD()
    logits, boxes, feats = torch.zeros(1, 3, 2), torch.zeros(1, 3, 4), [torch.zeros(1, 2, 2, 2)]
    with pytest.raises(ValueError, match="unpaired"):
        kd(logits, torch.zeros(1, 4, 2), boxes, boxes, feats, feats)
    with pytest.raises(ValueError, match="unpaired"):
        kd(logits, logits, boxes, torch.zeros(1, 2, 4), feats, feats)
    with pytest.raises(ValueError, match="pair one to one"):
        kd(logits, logits, boxes, boxes, feats, feats * 2)
    with pytest.raises(ValueError, match="temperature"):
        DenseOutputKD(temperature=0.0)


def test_dense_kd_leaves_out_anchors_whose_teacher_box_has_no_area():
    # Anchor 3 is a zero-width box (x1 == x2) in both models: GIoU is undefined there.
    student_logits = torch.tensor([STUDENT_LOGITS + [[0.0, 2.0]]])
    teacher_list = [[2.0, -1.0], [0.0, 1.0], [-2.0, -3.0], [3.0, 0.0]]
    flat = [5.0, 2.0, 5.0, 12.0]
    student_boxes = torch.tensor([STUDENT_BOXES + [flat]], requires_grad=True)
    kd = DenseOutputKD(cls_weight=0.0, feature_weight=0.0)
    terms = kd(student_logits, torch.tensor([teacher_list]), student_boxes, torch.tensor([TEACHER_BOXES + [flat]]),
               [], [])
    assert terms["afp_box"].item() == pytest.approx(hand_terms(teacher_list[:3], 2.0)["afp_box"], rel=1e-5)
    terms["afp_box"].backward()
    assert torch.all(student_boxes.grad[0, 3] == 0) and student_boxes.grad.abs().max() < 10
    only_flat = kd(student_logits[:, 3:], torch.tensor([teacher_list[3:]]), student_boxes[:, 3:].detach(),
                   torch.tensor([[flat]]), [], [])
    assert only_flat["afp_box"].item() == 0.0

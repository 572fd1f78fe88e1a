"""Baseline distillation losses (DKD, FitNet, AT, SP) against values worked out by hand.

The gradient checks use gradcheck's fast mode (random projections of the
Jacobian): the full Jacobian costs one forward pass per input element, and
these losses' softmax and pooling kernels each start the intra-op thread pool.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lib.losses import (
    AttentionTransferLoss,
    DKDLoss,
    HintLoss,
    SimilarityPreservingLoss,
    pool_to_smaller,
)

STUDENT_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER_LOGITS = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]
LABELS = [0, 2]


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def dkd_parts_by_hand(
    student: list[list[float]], teacher: list[list[float]], labels: list[int], temperature: float
) -> tuple[float, float]:
    """(TCKD, NCKD): KL of the (target, rest) split, and KL over the non-target classes."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, labels):
        p_s = softmax_by_hand([v / temperature for v in s_row])
        p_t = softmax_by_hand([v / temperature for v in t_row])
        rest = [c for c in range(len(s_row)) if c != y]
        b_s = [p_s[y], sum(p_s[c] for c in rest)]
        b_t = [p_t[y], sum(p_t[c] for c in rest)]
        tckd += kl_by_hand(b_t, b_s)
        q_s = softmax_by_hand([s_row[c] / temperature for c in rest])
        q_t = softmax_by_hand([t_row[c] / temperature for c in rest])
        nckd += kl_by_hand(q_t, q_s)
    scale = temperature**2 / len(student)
    return scale * tckd, scale * nckd


# --- DKDLoss ----------------------------------------------------------------


def test_dkd_written_out_one_sample() -> None:
    # Student logits 0, 0, 0: p_s = (1/3, 1/3, 1/3); teacher 0, log 2, 0: p_t = (1/4, 1/2, 1/4).
    # Label 0: b_s = (1/3, 2/3), b_t = (1/4, 3/4); over classes 1 and 2: q_s = (1/2, 1/2),
    # q_t = (2/3, 1/3). T = 1.
    tckd = 1 / 4 * math.log((1 / 4) / (1 / 3)) + 3 / 4 * math.log((3 / 4) / (2 / 3))
    nckd = 2 / 3 * math.log((2 / 3) / (1 / 2)) + 1 / 3 * math.log((1 / 3) / (1 / 2))
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[0.0, math.log(2.0), 0.0]])
    labels = torch.tensor([0])
    loss = DKDLoss(alpha=2.0, beta=3.0, temperature=1.0)(student, teacher, labels)
    assert loss.item() == pytest.approx(2 * tckd + 3 * nckd, rel=1e-5)


def test_dkd_two_classes_has_no_nckd() -> None:
    # One non-target class: its distribution is (1,) for both, NCKD = 0.
    # p_t = (3/4, 1/4) from logits (log 3, 0); p_s = (1/2, 1/2).
    expected = 3 / 4 * math.log(3 / 2) + 1 / 4 * math.log(1 / 2)
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=1.0)(
        torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_hand_value(temperature: float) -> None:
    tckd, nckd = dkd_parts_by_hand(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, temperature)
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=temperature)(
        torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS), torch.tensor(LABELS)
    )
    assert loss.item() == pytest.approx(tckd + 8 * nckd, rel=1e-5)


def test_dkd_alpha_only_is_tckd() -> None:
    tckd, _ = dkd_parts_by_hand(STUDENT_LOGITS, TEACHER_LOGITS, LABELS, 4.0)
    loss = DKDLoss(alpha=1.0, beta=0.0, temperature=4.0)(
        torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS), torch.tensor(LABELS)
    )
    assert loss.item() == pytest.approx(tckd, rel=1e-5)


def test_dkd_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3])
    loss_fn = DKDLoss(alpha=1.0, beta=8.0, temperature=2.0)
    assert torch.autograd.gradcheck(
        lambda s: loss_fn(s, teacher, labels), (student,), fast_mode=True
    )
    loss_fn(student, teacher, labels).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_dkd_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        DKDLoss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 3, 1\).*\(2, 3, 1\)"):
        DKDLoss()(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \(2,\).*\(2, 3\).*\(3,\)"):
        DKDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=0.0)


# --- pool_to_smaller --------------------------------------------------------


def test_pool_to_smaller_pools_each_dimension_down() -> None:
    a = torch.arange(8.0).view(1, 1, 4, 2)  # rows (0 1), (2 3), (4 5), (6 7)
    b = torch.arange(8.0).view(1, 1, 2, 4)
    pooled_a, pooled_b = pool_to_smaller(a, b)
    # a: average row pairs -> (1 2), (5 6); b: average column pairs -> (0.5 2.5), (4.5 6.5).
    assert pooled_a.flatten().tolist() == [1.0, 2.0, 5.0, 6.0]
    assert pooled_b.flatten().tolist() == [0.5, 2.5, 4.5, 6.5]
    same_a, same_b = pool_to_smaller(a, a.clone())
    assert same_a is a and same_b.shape == a.shape


# --- HintLoss ---------------------------------------------------------------


def test_hint_matches_hand_value() -> None:
    # 1x1 conv with weights (2, -1): channel 0 = 2 f, channel 1 = -f. f = (1 2; 3 4) pools
    # (after the conv) to 2 * 2.5 = 5 and -2.5; teacher (4, -2):
    # ((5 - 4)^2 + (-2.5 + 2)^2) / 2 = 0.625.
    loss_fn = HintLoss(student_channels=1, teacher_channels=2)
    assert loss_fn.adapter.bias is None
    with torch.no_grad():
        loss_fn.adapter.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    teacher = torch.tensor([4.0, -2.0]).view(1, 2, 1, 1)
    assert loss_fn(student, teacher).item() == pytest.approx(0.625)
    # Same sizes: adapted (2 4; 6 8) and (-1 -2; -3 -4) against zeros: (4+16+36+64+1+4+9+16) / 8.
    assert loss_fn(student, torch.zeros(1, 2, 2, 2)).item() == pytest.approx(150 / 8)


def test_hint_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    loss_fn = HintLoss(student_channels=2, teacher_channels=3).double()
    student = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,), fast_mode=True)
    loss_fn(student, teacher).backward()
    assert student.grad is not None
    assert loss_fn.adapter.weight.grad is not None
    assert teacher.grad is None


def test_hint_shape_errors() -> None:
    loss_fn = HintLoss(student_channels=3, teacher_channels=4)
    with pytest.raises(ValueError, match=r"\(2, 5, 2, 2\).*\(2, 4, 4, 4\).*\(N, 3, h, w\)"):
        loss_fn(torch.zeros(2, 5, 2, 2), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\).*\(2, 6, 4, 4\).*\(N, 4, H, W\)"):
        loss_fn(torch.zeros(2, 3, 2, 2), torch.zeros(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\).*\(1, 4, 4, 4\)"):
        loss_fn(torch.zeros(2, 3, 2, 2), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 2\).*\(2, 4, 4, 4\)"):
        loss_fn(torch.zeros(2, 3, 2), torch.zeros(2, 4, 4, 4))


# --- AttentionTransferLoss --------------------------------------------------


def test_at_matches_hand_value() -> None:
    # Student, 2 channels over 1x2 pixels: (1, 2) and (1, 0); mean of squares (1, 2),
    # normalized (1, 2) / sqrt 5. Teacher, 1 channel (3, 4): (9, 16) / sqrt 337.
    a_s = [1 / math.sqrt(5), 2 / math.sqrt(5)]
    a_t = [9 / math.sqrt(337), 16 / math.sqrt(337)]
    expected = ((a_s[0] - a_t[0]) ** 2 + (a_s[1] - a_t[1]) ** 2) / 2
    student = torch.tensor([[1.0, 2.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    teacher = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    loss_fn = AttentionTransferLoss()
    assert loss_fn([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
    # Layers add up.
    assert loss_fn([student, student], [teacher, teacher]).item() == pytest.approx(
        2 * expected, rel=1e-6
    )


def test_at_pools_the_hr_feature_by_default_and_the_attention_map_on_request() -> None:
    # LR student (1, 1, 2, 2) of ones: attention 1 everywhere, normalized 1/2.
    # HR teacher (1, 1, 4, 4), 2x2 blocks (1 1; 1 1), (2 0; 0 0), (0 0; 0 0), (1 -1; 1 -1).
    # Feature pooled first (Pixel Distillation's code): block means 1, 0.5, 0, 0, squared
    # (1, 0.25, 0, 0), normalized by sqrt(1.0625).
    # Attention pooled: block means of squares 1, 1, 0, 1, normalized (1, 1, 0, 1) / sqrt 3.
    teacher = torch.tensor(
        [
            [1.0, 1.0, 2.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, -1.0],
            [0.0, 0.0, 1.0, -1.0],
        ]
    ).view(1, 1, 4, 4)
    student = torch.ones(1, 1, 2, 2)
    norm = math.sqrt(1.0625)
    by_feature = ((0.5 - 1 / norm) ** 2 + (0.5 - 0.25 / norm) ** 2 + 2 * 0.5**2) / 4
    by_attention = (3 * (0.5 - 1 / math.sqrt(3)) ** 2 + 0.5**2) / 4
    for loss_fn, expected in ((AttentionTransferLoss(), by_feature),
                              (AttentionTransferLoss(pool="attention"), by_attention)):
        assert loss_fn([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
        # An HR student against an LR teacher pools the student instead.
        assert loss_fn([teacher], [student]).item() == pytest.approx(expected, rel=1e-6)


def test_at_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    # Layer 0: LR student, HR teacher; layer 1: the student is larger in one dimension only.
    students = [
        torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 1, 1, 3, dtype=torch.float64, requires_grad=True),
    ]
    teachers = [
        torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True),
    ]
    loss_fn = AttentionTransferLoss()
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn([a, b], teachers), tuple(students), fast_mode=True
    )
    loss_fn(students, teachers).backward()
    assert all(s.grad is not None for s in students)
    assert all(t.grad is None for t in teachers)


def test_at_errors() -> None:
    loss_fn = AttentionTransferLoss()
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        loss_fn([torch.zeros(1, 1, 2, 2)] * 2, [torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="non-zero"):
        loss_fn([], [])
    with pytest.raises(ValueError, match=r"pair 0.*\(2, 1, 2, 2\).*\(3, 1, 4, 4\)"):
        loss_fn([torch.zeros(2, 1, 2, 2)], [torch.zeros(3, 1, 4, 4)])
    with pytest.raises(ValueError, match=r"pair 0.*\(2, 4\).*\(2, 1, 4, 4\)"):
        loss_fn([torch.zeros(2, 4)], [torch.zeros(2, 1, 4, 4)])
    with pytest.raises(ValueError, match="pool must be one of"):
        AttentionTransferLoss(pool="map")
    with pytest.raises(ValueError, match="p must be > 0"):
        AttentionTransferLoss(p=0.0)


# --- SimilarityPreservingLoss -----------------------------------------------


def test_sp_matches_hand_value() -> None:
    # Student rows (1, 0), (1, 1): F F^T = (1 1; 1 2), rows normalized (1, 1) / sqrt 2 and
    # (1, 2) / sqrt 5. Teacher rows (1, 0, 0, 0), (0, 0, 0, 1): F F^T = I, already normalized.
    r2, r5 = math.sqrt(2), math.sqrt(5)
    squared = (1 / r2 - 1) ** 2 + (1 / r2) ** 2 + (1 / r5) ** 2 + (2 / r5 - 1) ** 2
    expected = squared / 2**2
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]).view(2, 1, 2, 2)
    loss_fn = SimilarityPreservingLoss()
    assert loss_fn([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn([student, student], [teacher, teacher]).item() == pytest.approx(
        2 * expected, rel=1e-6
    )


def test_sp_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    students = [
        torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True),
    ]
    teachers = [
        torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True),
    ]
    loss_fn = SimilarityPreservingLoss()
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn([a, b], teachers), tuple(students), fast_mode=True
    )
    loss_fn(students, teachers).backward()
    assert all(s.grad is not None for s in students)
    assert all(t.grad is None for t in teachers)


def test_sp_errors() -> None:
    loss_fn = SimilarityPreservingLoss()
    with pytest.raises(ValueError, match="1 student and 2 teacher"):
        loss_fn([torch.zeros(2, 1, 2, 2)], [torch.zeros(2, 1, 2, 2)] * 2)
    with pytest.raises(ValueError, match="non-zero"):
        loss_fn([], [])
    with pytest.raises(ValueError, match=r"pair 0.*\(2, 1, 2, 2\).*\(4, 1, 2, 2\)"):
        loss_fn([torch.zeros(2, 1, 2, 2)], [torch.zeros(4, 1, 2, 2)])

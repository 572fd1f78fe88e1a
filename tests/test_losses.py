"""Distillation losses against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lib.losses import ISRDLoss, KDLoss, UpsampledFeatureMSE

STUDENT_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER_LOGITS = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]


def softmax_by_hand(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kd_by_hand(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 / N * sum_n sum_c p_t log(p_t / p_s)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s = softmax_by_hand(s_row, temperature)
        p_t = softmax_by_hand(t_row, temperature)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return temperature**2 * total / len(student)


# --- KDLoss -----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_hand_value(temperature: float) -> None:
    loss = KDLoss(temperature)(torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS))
    expected = kd_by_hand(STUDENT_LOGITS, TEACHER_LOGITS, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_hand_value_at_t1_written_out() -> None:
    # Row 2: the student is uniform, so KL = sum p_t log p_t + log 3, p_t = softmax(1, 0, -1).
    e = math.e
    z = e + 1 + 1 / e
    p = [e / z, 1 / z, (1 / e) / z]
    row2 = sum(v * math.log(v) for v in p) + math.log(3)
    # Row 1: p_t is p_s reversed, with p_s = softmax(1, 2, 3) = (p[2], p[1], p[0]).
    row1 = p[0] * math.log(p[0] / p[2]) + p[2] * math.log(p[2] / p[0])
    expected = (row1 + row2) / 2
    loss = KDLoss(1.0)(torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_for_equal_logits() -> None:
    logits = torch.randn(4, 10)
    assert KDLoss(4.0)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    loss_fn = KDLoss(2.0)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))
    loss_fn(student, teacher).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_kd_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_kd_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)


# --- ISRDLoss ---------------------------------------------------------------


def test_isrd_matches_hand_value() -> None:
    # One-channel 2x2 feature, 3x3 HR image: s = ceil(3 / 2) = 2, 12 conv
    # channels, a 4x4 shuffled image cropped to its top-left 3x3.
    feature = np.array([[1.0, -1.0], [2.0, 0.5]])
    weights = np.arange(12) - 5.5  # conv channel k: w_k * f
    slopes = np.array([0.1, 0.2, 0.3])  # PReLU slope per output channel
    target = np.arange(27).reshape(3, 3, 3) / 10 - 1

    # PixelShuffle: output (c, s*y + i, s*x + j) = conv channel c*s^2 + i*s + j at (y, x).
    decoded = np.zeros((3, 4, 4))
    for c in range(3):
        for y in range(2):
            for x in range(2):
                for i in range(2):
                    for j in range(2):
                        v = weights[c * 4 + i * 2 + j] * feature[y, x]
                        decoded[c, 2 * y + i, 2 * x + j] = v if v > 0 else slopes[c] * v
    expected = np.abs(decoded[:, :3, :3] - target).mean()

    loss_fn = ISRDLoss(in_channels=1, feature_size=2, hr_size=3)
    assert loss_fn.decoder.scale == 2
    with torch.no_grad():
        loss_fn.decoder.conv.weight.copy_(torch.tensor(weights).view(12, 1, 1, 1))
        loss_fn.decoder.prelu.weight.copy_(torch.tensor(slopes))
    loss = loss_fn(
        torch.tensor(feature, dtype=torch.float32).view(1, 1, 2, 2),
        torch.tensor(target, dtype=torch.float32).unsqueeze(0),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_isrd_gradcheck_and_no_image_gradient() -> None:
    torch.manual_seed(0)
    loss_fn = ISRDLoss(in_channels=2, feature_size=3, hr_size=5).double()
    feature = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, image), (feature,))
    loss_fn(feature, image).backward()
    assert loss_fn.decoder.conv.weight.grad is not None
    assert image.grad is None


def test_isrd_shape_mismatch() -> None:
    loss_fn = ISRDLoss(in_channels=2, feature_size=3, hr_size=5)
    with pytest.raises(ValueError, match=r"\(1, 3, 5, 5\).*\(1, 3, 6, 6\)"):
        loss_fn(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 6, 6))


# --- UpsampledFeatureMSE ----------------------------------------------------


def test_feature_mse_matches_hand_value() -> None:
    # Pair 0: a 1x1 student map upsampled to 2x2 is constant 3;
    #   teacher (1, 2; 3, 4): ((3-1)^2 + (3-2)^2 + 0^2 + (3-4)^2) / 4 = 1.5.
    # Pair 1: 1x2 -> 1x4 with half-pixel centres: (0, 4) -> (0, 1, 3, 4);
    #   teacher zeros: (0 + 1 + 9 + 16) / 4 = 6.5.
    # Mean over the pairs: (1.5 + 6.5) / 2 = 4.0.
    students = [torch.tensor([[[[3.0]]]]), torch.tensor([[[[0.0, 4.0]]]])]
    teachers = [torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.zeros(1, 1, 1, 4)]
    loss_fn = UpsampledFeatureMSE()
    assert loss_fn(students[:1], teachers[:1]).item() == pytest.approx(1.5)
    assert loss_fn(students[1:], teachers[1:]).item() == pytest.approx(6.5)
    assert loss_fn(students, teachers).item() == pytest.approx(4.0)


def test_feature_mse_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    students = [
        torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True),
    ]
    teachers = [
        torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True),
    ]
    loss_fn = UpsampledFeatureMSE()
    assert torch.autograd.gradcheck(lambda a, b: loss_fn([a, b], teachers), tuple(students))
    loss_fn(students, teachers).backward()
    assert all(s.grad is not None for s in students)
    assert all(t.grad is None for t in teachers)


def test_feature_mse_channel_mismatch_names_the_pair() -> None:
    students = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2)]
    teachers = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 4, 4)]
    with pytest.raises(ValueError, match=r"pair 1.*\(1, 3, 2, 2\).*\(1, 5, 4, 4\)"):
        UpsampledFeatureMSE()(students, teachers)


def test_feature_mse_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        UpsampledFeatureMSE()([torch.zeros(1, 1, 2, 2)] * 2, [torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="non-zero"):
        UpsampledFeatureMSE()([], [])

"""MSAD's C-FF module and feature KD loss against hand-computed values."""

import pytest
import torch

from kd_lib.losses import CrossFeatureFusion, MSADDistillLoss


def test_cff_weights_sum_to_one_per_image_and_mix_the_two_levels():
    torch.manual_seed(0)
    fusion = CrossFeatureFusion(16)
    hr, lr = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    fused, weights = fusion(hr, lr)
    assert weights.shape == (3, 2) and torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    for n in range(3):
        torch.testing.assert_close(fused[n], weights[n, 0] * hr[n] + weights[n, 1] * lr[n])


def test_cff_with_zero_weights_averages_the_levels():
    fusion = CrossFeatureFusion(8)
    torch.nn.init.zeros_(fusion.mix[2].weight)  # equal logits: softmax gives (1/2, 1/2)
    hr, lr = torch.full((1, 8, 2, 2), 2.0), torch.full((1, 8, 2, 2), 4.0)
    fused, weights = fusion(hr, lr)
    assert weights.tolist() == [[0.5, 0.5]] and torch.all(fused == 3.0)


def test_cff_rejects_levels_of_different_grids():
    with pytest.raises(ValueError, match=r"\(1, 8, 4, 4\).*\(1, 8, 2, 2\)"):
        CrossFeatureFusion(8)(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2))


def test_msad_kd_is_alpha_t2_l1_of_the_tempered_features():
    student = [torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[6.0]]]])]
    teacher = [torch.zeros(1, 1, 2, 2), torch.tensor([[[[3.0]]]])]
    # level 1: mean |s/3 - 0| = (1 + 2 + 3 + 4) / 4 / 3 = 5/6; level 2: |6 - 3| / 3 = 1.
    # 0.2 * 9 * (5/6 + 1) = 3.3
    assert MSADDistillLoss(alpha=0.2, temperature=3.0)(student, teacher).item() == pytest.approx(3.3)


def test_msad_kd_gradcheck_and_frozen_teacher():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = MSADDistillLoss()
    assert torch.autograd.gradcheck(lambda s: loss([s], [teacher]), (student,))
    loss([student], [teacher]).backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match="level 0"):
        loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 1, 1)])

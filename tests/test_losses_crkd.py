"""Cross-resolution KD terms of RKD against values worked out by hand."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lib.losses import (
    AdversarialLoss,
    Discriminator,
    EmbeddingAdapter,
    MMDLoss,
    NormalizedEmbeddingLoss,
    PairwiseDistanceLoss,
    gaussian_mmd2,
    mmd2,
)

# --- EmbeddingAdapter -------------------------------------------------------


def test_adapter_matches_hand_value() -> None:
    # W = (1 2; 0 -1; 3 0): (1, 1) -> (3, -1, 3), (2, -1) -> (0, 1, 6).
    adapter = EmbeddingAdapter(student_dim=2, teacher_dim=3)
    assert isinstance(adapter.projection, torch.nn.Linear) and adapter.projection.bias is None
    with torch.no_grad():
        adapter.projection.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]]))
    out = adapter(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
    assert out.tolist() == [[3.0, -1.0, 3.0], [0.0, 1.0, 6.0]]


def test_adapter_is_identity_for_equal_widths() -> None:
    adapter = EmbeddingAdapter(student_dim=4, teacher_dim=4)
    assert isinstance(adapter.projection, torch.nn.Identity)
    assert not list(adapter.parameters())
    embedding = torch.randn(3, 4)
    assert torch.equal(adapter(embedding), embedding)


def test_adapter_gradcheck() -> None:
    torch.manual_seed(0)
    adapter = EmbeddingAdapter(student_dim=3, teacher_dim=2).double()
    embedding = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(adapter, (embedding,))


def test_adapter_shape_errors() -> None:
    adapter = EmbeddingAdapter(student_dim=3, teacher_dim=2)
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(2, 4\)"):
        adapter(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(2, 3, 1\)"):
        adapter(torch.zeros(2, 3, 1))


# --- NormalizedEmbeddingLoss ------------------------------------------------


def test_normalized_embedding_matches_hand_value() -> None:
    # Row 0: (3, 4) / 5 = (0.6, 0.8) against (4, 3) / 5 = (0.8, 0.6): 0.04 + 0.04 = 0.08.
    # Row 1: (1, 0) against (0, 2) / 2 = (0, 1): 1 + 1 = 2. Mean: 1.04.
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    assert NormalizedEmbeddingLoss()(student, teacher).item() == pytest.approx(1.04, rel=1e-6)


def test_normalized_embedding_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss_fn = NormalizedEmbeddingLoss()
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))
    loss_fn(student, teacher).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_normalized_embedding_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        NormalizedEmbeddingLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 3\)"):
        NormalizedEmbeddingLoss()(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 1\).*\(2, 3, 1\)"):
        NormalizedEmbeddingLoss()(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))


# --- PairwiseDistanceLoss ---------------------------------------------------


def smooth_l1_by_hand(difference: float) -> float:
    return 0.5 * difference**2 if abs(difference) < 1 else abs(difference) - 0.5


def test_pairwise_matches_hand_value() -> None:
    # Student points 0, 1, 3 on a line: distances 1, 3, 2, mean 2 -> 0.5, 1.5, 1.0.
    # Teacher points (0, 0), (3, 0), (0, 4): distances 3, 4, 5, mean 4 -> 0.75, 1.0, 1.25.
    # Each pair appears twice among the 6 off-diagonal entries, so the mean is over the 3 pairs.
    expected = (smooth_l1_by_hand(0.5 - 0.75) + smooth_l1_by_hand(1.5 - 1.0)
                + smooth_l1_by_hand(1.0 - 1.25)) / 3
    assert expected == pytest.approx(0.0625)
    student = torch.tensor([[0.0], [1.0], [3.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert PairwiseDistanceLoss()(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_linear_branch_and_coinciding_embeddings() -> None:
    # Student points 0, 0, 6: distances 0, 6, 6, mean of the positive ones 6 -> 0, 1, 1.
    # Teacher points 0, 1, 10: distances 1, 10, 9, mean 20/3 -> 0.15, 1.5, 1.35.
    expected = (smooth_l1_by_hand(0 - 0.15) + smooth_l1_by_hand(1 - 1.5)
                + smooth_l1_by_hand(1 - 1.35)) / 3
    student = torch.tensor([[0.0], [0.0], [6.0]])
    teacher = torch.tensor([[0.0], [1.0], [10.0]])
    assert PairwiseDistanceLoss()(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # All student embeddings equal: mu clamped, normalized distances 0. Teacher points 0, 0, 3:
    # distances 0, 3, 3, mean of the positive ones 3 -> 0, 1, 1; smooth L1 0, 0.5, 0.5.
    teacher = torch.tensor([[0.0], [0.0], [3.0]])
    loss = PairwiseDistanceLoss()(torch.ones(3, 2), teacher)
    assert loss.item() == pytest.approx(1 / 3, rel=1e-6)


def test_pairwise_is_invariant_to_scaling_either_batch() -> None:
    torch.manual_seed(0)
    student = torch.randn(5, 3)
    teacher = torch.randn(5, 7)
    loss_fn = PairwiseDistanceLoss()
    base = loss_fn(student, teacher).item()
    assert base > 0
    assert loss_fn(3.0 * student, teacher).item() == pytest.approx(base, rel=1e-5)
    assert loss_fn(student, 0.1 * teacher).item() == pytest.approx(base, rel=1e-5)


def test_pairwise_gradcheck_and_no_teacher_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss_fn = PairwiseDistanceLoss()
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))
    loss_fn(student, teacher).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_pairwise_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"at least 2.*\(1, 3\).*\(1, 4\)"):
        PairwiseDistanceLoss()(torch.zeros(1, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 4\)"):
        PairwiseDistanceLoss()(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 1\).*\(2, 4\)"):
        PairwiseDistanceLoss()(torch.zeros(2, 3, 1), torch.zeros(2, 4))


# --- MMD --------------------------------------------------------------------


def kernel_by_hand(distance: float, sigmas: list[float]) -> float:
    return sum(math.exp(-(distance**2) / (2 * s**2)) for s in sigmas) / len(sigmas)


def mmd2_by_hand(x: list[float], y: list[float], sigmas: list[float]) -> float:
    """1-D points: mean k over x-x pairs + over y-y pairs - 2 * mean over x-y pairs."""
    def mean_kernel(a: list[float], b: list[float]) -> float:
        return sum(kernel_by_hand(abs(p - q), sigmas) for p in a for q in b) / (len(a) * len(b))

    return mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)


def test_mmd_matches_hand_value_odd_pair_count() -> None:
    # Pooled points 0, 1, 3: distances 1, 3, 2, median 2; factors 0.5 and 1 -> sigmas 1 and 2.
    # k(d) = (exp(-d^2 / 2) + exp(-d^2 / 8)) / 2.
    k = [kernel_by_hand(d, [1.0, 2.0]) for d in (0, 1, 2, 3)]
    expected = (2 * k[0] + 2 * k[1]) / 4 + k[0] - 2 * (k[3] + k[2]) / 2
    assert expected == pytest.approx(mmd2_by_hand([0.0, 1.0], [3.0], [1.0, 2.0]))
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    assert mmd2(x, y, (0.5, 1.0)).item() == pytest.approx(expected, rel=1e-5)
    assert MMDLoss((0.5, 1.0))(x, y).item() == pytest.approx(expected, rel=1e-5)


def test_mmd_median_is_the_lower_middle_value() -> None:
    # Pooled points 0, 1, 3, 7: distances 1, 3, 7, 2, 6, 4 -> sorted 1 2 3 4 6 7, median 3.
    x, y = [0.0, 1.0], [3.0, 7.0]
    expected = mmd2_by_hand(x, y, [3.0 * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)])
    loss = MMDLoss()(torch.tensor(x).view(2, 1), torch.tensor(y).view(2, 1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mmd_is_zero_for_equal_batches_and_positive_for_shifted() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    loss_fn = MMDLoss()
    assert loss_fn(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(x, x + 1.0).item() > 0.05


def test_gaussian_mmd2_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, dtype=torch.float64)
    bandwidths = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gaussian_mmd2(a, y, bandwidths), (x,))


def test_mmd_gradient_treats_the_median_as_a_constant() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    factors = (0.5, 1.0, 2.0)
    points = torch.cat([x, y]).tolist()
    distances = sorted(math.dist(p, q) for p, q in itertools.combinations(points, 2))
    median = distances[(len(distances) - 1) // 2]
    bandwidths = torch.tensor([median * f for f in factors], dtype=torch.float64)

    MMDLoss(factors)(x, y).backward()
    assert y.grad is None
    (expected,) = torch.autograd.grad(gaussian_mmd2(x, y, bandwidths), x)
    torch.testing.assert_close(x.grad, expected)


def test_mmd_errors() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        MMDLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(0, 3\) and \(2, 3\)"):
        MMDLoss()(torch.zeros(0, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 1\) and \(2, 3\)"):
        mmd2(torch.zeros(2, 3, 1), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="bandwidth factors"):
        MMDLoss((1.0, 0.0))
    with pytest.raises(ValueError, match="bandwidth factors"):
        mmd2(torch.zeros(2, 3), torch.zeros(2, 3), ())
    with pytest.raises(ValueError, match=r"1-D.*\(1, 2\)"):
        gaussian_mmd2(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(1, 2))


# --- Discriminator and AdversarialLoss --------------------------------------


def optimized_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def set_discriminator(discriminator: Discriminator) -> None:
    """Hidden = identity of a 2-D input, output weights (1, 2), bias 0.5."""
    with torch.no_grad():
        discriminator.layers[0].weight.copy_(torch.eye(2))
        discriminator.layers[0].bias.zero_()
        discriminator.layers[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
        discriminator.layers[2].bias.fill_(0.5)


def test_discriminator_matches_hand_value() -> None:
    # (1, -2) -> hidden (1, -0.4) after LeakyReLU(0.2) -> 1 - 0.8 + 0.5 = 0.7;
    # (0, 1) -> (0, 1) -> 2.5.
    discriminator = Discriminator(dim=2, hidden=2)
    set_discriminator(discriminator)
    logits = discriminator(torch.tensor([[1.0, -2.0], [0.0, 1.0]]))
    assert logits.shape == (2,)
    assert logits.tolist() == pytest.approx([0.7, 2.5])


def test_discriminator_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 4\)"):
        Discriminator(dim=2)(torch.zeros(3, 4))


def test_adversarial_losses_match_hand_values() -> None:
    # BCE with logits: -log sigmoid(z) = log(1 + e^-z) for target 1, log(1 + e^z) for target 0.
    # Fake (1, -2), (0, 1) -> logits 0.7, 2.5; real (0, 0) -> 0.5.
    adversarial = AdversarialLoss(dim=2, hidden=2)
    set_discriminator(adversarial.discriminator)
    fake = torch.tensor([[1.0, -2.0], [0.0, 1.0]])
    real = torch.tensor([[0.0, 0.0]])
    generator = (math.log(1 + math.exp(-0.7)) + math.log(1 + math.exp(-2.5))) / 2
    assert adversarial(fake).item() == pytest.approx(generator, rel=1e-6)
    discriminator = math.log(1 + math.exp(-0.5)) + (
        math.log(1 + math.exp(0.7)) + math.log(1 + math.exp(2.5))
    ) / 2
    step_loss = adversarial.discriminator_step(real, fake)
    assert step_loss.item() == pytest.approx(discriminator, rel=1e-6)


def test_adversarial_gradcheck_reaches_only_the_fake() -> None:
    torch.manual_seed(0)
    adversarial = AdversarialLoss(dim=3, hidden=4).double()
    assert optimized_ids(adversarial.optimizer) == {id(p) for p in adversarial.parameters()}
    fake = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(adversarial, (fake,))
    adversarial(fake).backward()
    assert fake.grad is not None
    assert all(p.grad is None for p in adversarial.parameters())


def test_adversarial_shape_errors() -> None:
    adversarial = AdversarialLoss(dim=2, hidden=2)
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 4\)"):
        adversarial(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(N, 2\).*\(3, 4\)"):
        adversarial.discriminator_step(torch.zeros(3, 2), torch.zeros(3, 4))


def test_alternating_step_updates_each_side_with_its_own_optimizer() -> None:
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    student_optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    adversarial = AdversarialLoss(dim=2, hidden=4, lr=0.01)
    discriminator_params = list(adversarial.discriminator.parameters())
    student_ids = {id(p) for p in student.parameters()}
    discriminator_ids = {id(p) for p in discriminator_params}
    assert not optimized_ids(student_optimizer) & discriminator_ids
    assert not optimized_ids(adversarial.optimizer) & student_ids

    inputs = torch.randn(4, 3)
    real = torch.randn(4, 2)
    separate = copy.deepcopy(adversarial)
    student_before = [p.detach().clone() for p in student.parameters()]
    discriminator_before = [p.detach().clone() for p in discriminator_params]

    # 1. Discriminator step on the detached batch; 2. generator loss through the updated D.
    fake = student(inputs)
    adversarial.discriminator_step(real, fake)
    discriminator_after = [p.detach().clone() for p in discriminator_params]
    student_optimizer.zero_grad()
    adversarial(fake).backward()
    assert all(p.grad is None for p in discriminator_params)
    student_optimizer.step()

    assert any(not torch.equal(a, b) for a, b in zip(discriminator_before, discriminator_after))
    assert all(torch.equal(p, a) for p, a in zip(discriminator_params, discriminator_after))
    assert any(not torch.equal(p, b) for p, b in zip(student.parameters(), student_before))

    # Its own optimizer alone gives the same discriminator, from the same inputs.
    separate.discriminator_step(real, fake.detach())
    for p, q in zip(separate.discriminator.parameters(), discriminator_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    # The first Adam step by hand: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps).
    reference = copy.deepcopy(separate.discriminator)
    with torch.no_grad():
        for p, before in zip(reference.parameters(), discriminator_before):
            p.copy_(before)
    real_logits, fake_logits = reference(real), reference(fake.detach())
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for before, g, after in zip(discriminator_before, grads, discriminator_after):
        torch.testing.assert_close(after, before - 0.01 * g / (g.abs() + 1e-8))


def test_adversarial_resumes_from_saved_optimizer_state() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(4, 2), torch.randn(4, 2)
    original = AdversarialLoss(dim=2, hidden=4)
    original.discriminator_step(real, fake)
    resumed = AdversarialLoss(dim=2, hidden=4)
    resumed.load_state_dict(original.state_dict())
    resumed.load_optimizer_state_dict(copy.deepcopy(original.optimizer_state_dict()))
    original.discriminator_step(real, fake)
    resumed.discriminator_step(real, fake)
    for p, q in zip(original.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_discriminator_step_runs_under_no_grad() -> None:
    torch.manual_seed(0)
    adversarial = AdversarialLoss(dim=2, hidden=4)
    before = [p.detach().clone() for p in adversarial.parameters()]
    with torch.no_grad():
        adversarial.discriminator_step(torch.randn(3, 2), torch.randn(3, 2))
    assert any(not torch.equal(p, b) for p, b in zip(adversarial.parameters(), before))

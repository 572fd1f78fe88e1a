"""Cross-resolution KD terms of RKD: embedding alignment, pairwise distances, MMD, adversarial.

RKD (resolution-aware knowledge distillation, IEEE TIP 2021) distills an HR
teacher into an LR student with a discriminator trained adversarially and a
cross-resolution KD loss made of a resolution-aware distillation loss, a
pair-wise constraint and an MMD loss. Only the abstract is public and the
code was never released, so every term here is our reconstruction (see
METHODS.md, "RKD"). All terms act on embeddings: ``(N, D)`` pooled
penultimate features, the student's from the LR image and the teacher's from
the HR image of the same crop. Each term's weight is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_lib.ops import multi_bandwidth_mmd2
from kd_lib.ops.mmd import check_batches

DEFAULT_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, same_width: bool) -> None:
    """Raise ValueError unless both are 2-D with one batch size (and one width if asked)."""
    if (
        student.dim() != 2
        or teacher.dim() != 2
        or student.shape[0] != teacher.shape[0]
        or (same_width and student.shape[1] != teacher.shape[1])
    ):
        shapes = "(N, D) of one shape" if same_width else "(N, D_s) and (N, D_t)"
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings "
            f"must be {shapes}"
        )


class EmbeddingAdapter(nn.Module):
    """Linear map of student embeddings to the teacher's width, for the embedding loss.

    Our reconstruction of RKD's resolution-aware distillation, which compares
    teacher and student embeddings "through a linear adapter when the widths
    differ" (METHODS.md): ``Linear(student_dim, teacher_dim)`` without bias
    when the widths differ, the identity otherwise. Its parameters train with
    the student, and it is dropped at deployment.

    Args:
        student_dim: width of the student's embeddings.
        teacher_dim: width of the teacher's embeddings.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.projection: nn.Module = (
            nn.Identity() if student_dim == teacher_dim
            else nn.Linear(student_dim, teacher_dim, bias=False)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(N, teacher_dim)`` for an ``(N, student_dim)`` embedding.

        Raises:
            ValueError: ``embedding`` is not ``(N, student_dim)``.
        """
        if embedding.dim() != 2 or embedding.shape[1] != self.student_dim:
            raise ValueError(
                f"embedding must be (N, {self.student_dim}), got {tuple(embedding.shape)}"
            )
        return self.projection(embedding)


class NormalizedEmbeddingLoss(nn.Module):
    """Squared L2 distance between L2-normalized student and teacher embeddings.

    Our reconstruction of the embedding part of RKD's resolution-aware
    distillation loss (the logit part is :class:`~kd_lib.losses.KDLoss`)::

        L_emb = 1/N * sum_n || s_n / ||s_n|| - t_n / ||t_n|| ||_2^2

    that is ``2 - 2 cos(s_n, t_n)`` averaged over the batch. ``s`` is the
    student's LR embedding already mapped to the teacher's width by an
    :class:`EmbeddingAdapter`; ``t`` is the teacher's HR embedding, detached.
    Normalizing compares directions only, so the loss does not depend on the
    two networks' feature scales.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(N, D)`` student and teacher embeddings.

        Raises:
            ValueError: the embeddings are not 2-D of one shape.
        """
        _check_pair(student, teacher, same_width=True)
        difference = F.normalize(student, dim=1) - F.normalize(teacher.detach(), dim=1)
        return difference.pow(2).sum(dim=1).mean()


class PairwiseDistanceLoss(nn.Module):
    """Distance-wise relational KD: match the batch's mean-normalized distance matrices.

    RKD's pair-wise constraint, reconstructed as the distance-wise loss of
    Park et al., "Relational Knowledge Distillation", CVPR 2019 (RKD-D;
    official code lenscloth/RKD, ``metric/loss.py``, ``RkdDistance``). With
    ``d_ij = ||e_i - e_j||_2`` over the batch and ``mu`` the mean of the
    positive ``d_ij`` (``i != j``)::

        L_pair = mean_{i != j} smooth_l1(d^s_ij / mu^s - d^t_ij / mu^t)

    ``smooth_l1`` with PyTorch's default ``beta = 1``. The distances live in
    each network's own space, so student and teacher widths may differ, and
    the normalization makes the loss invariant to scaling either batch. The
    teacher's embeddings are detached; the student's ``mu`` keeps its
    gradient, as in Park et al.

    Our choice: the mean runs over the ``N (N - 1)`` off-diagonal entries
    (Park et al. also average in the zero diagonal). A batch whose embeddings
    all coincide has ``mu = 0``, clamped to ``1e-12``, so its normalized
    distances are zero.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(N, D_s)`` student and ``(N, D_t)`` teacher embeddings, N >= 2.

        Raises:
            ValueError: the embeddings are not 2-D with one batch size of at
                least 2.
        """
        _check_pair(student, teacher, same_width=False)
        if student.shape[0] < 2:
            raise ValueError(
                f"pairwise distances need a batch of at least 2, got student "
                f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        return F.smooth_l1_loss(
            _normalized_distances(student), _normalized_distances(teacher.detach())
        )


def _normalized_distances(embedding: torch.Tensor) -> torch.Tensor:
    """The ``N (N - 1)`` off-diagonal distances over the mean of the positive ones."""
    n = embedding.shape[0]
    distances = torch.cdist(embedding, embedding)
    off_diagonal = distances[~torch.eye(n, dtype=torch.bool, device=embedding.device)]
    positive = (off_diagonal > 0).sum().clamp_min(1)
    return off_diagonal / (off_diagonal.sum() / positive).clamp_min(1e-12)


def _check_factors(bandwidth_factors: Sequence[float]) -> None:
    if not bandwidth_factors or any(factor <= 0 for factor in bandwidth_factors):
        raise ValueError(
            f"bandwidth factors must be a non-empty list of values > 0, got {bandwidth_factors}"
        )


def gaussian_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between two batches under a Gaussian kernel averaged over bandwidths.

    For ``x`` of shape ``(N, D)``, ``y`` of shape ``(M, D)`` and bandwidths
    ``sigma_1 .. sigma_K``::

        k(a, b) = 1/K * sum_k exp(-||a - b||^2 / (2 sigma_k^2))
        MMD^2   = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)

    the V-statistic of Gretton et al., "A Kernel Two-Sample Test", JMLR 2012
    (the diagonal terms included, so it is >= 0, and 0 for equal
    batches). The bandwidths are used as given, with no gradient through
    them; :func:`mmd2` picks them from the data. Computed by
    :func:`kd_lib.ops.multi_bandwidth_mmd2` (a CUDA kernel on GPUs), in
    float32 (float64 for float64 batches).

    Raises:
        ValueError: ``x`` and ``y`` are not non-empty floating 2-D batches of one
            width, or ``bandwidths`` is not a non-empty 1-D tensor.
    """
    return multi_bandwidth_mmd2(x, y, bandwidths)


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> torch.Tensor:
    """:func:`gaussian_mmd2` with bandwidths ``median * factor``, one per factor.

    ``median`` is the median distance ``||z_i - z_j||`` over the pairs
    ``i < j`` of the pooled batch ``z = [x; y]`` (the lower of the two middle
    values when their count is even, as ``torch.median``), detached and
    clamped to >= 1e-6: the median heuristic of Gretton et al. 2012, spread
    over several scales as in multi-kernel MMD (Long et al., "Learning
    Transferable Features with Deep Adaptation Networks", ICML 2015).

    Raises:
        ValueError: as :func:`gaussian_mmd2`, or a factor is not > 0.
    """
    _check_factors(bandwidth_factors)
    check_batches(x, y)  # before the median, which would fail on them less clearly
    median = torch.pdist(torch.cat([x, y]).detach()).median().clamp_min(1e-6)
    factors = torch.tensor(bandwidth_factors, dtype=median.dtype, device=median.device)
    return gaussian_mmd2(x, y, median * factors)


class MMDLoss(nn.Module):
    """Multi-bandwidth Gaussian MMD^2 between the teacher's HR and the student's LR embeddings.

    RKD's MMD term, reconstructed: :func:`mmd2` of the student's batch and the
    teacher's (detached), the bandwidths the median pairwise distance of the
    pooled batch times each factor. It pulls the distribution of LR student
    embeddings onto that of HR teacher embeddings without pairing samples, so
    the widths must match (adapt the student first with an
    :class:`EmbeddingAdapter`).

    Our choices: the biased (V-statistic) estimate, which is never negative;
    the kernel averages over the bandwidths rather than summing them, so the
    loss's scale does not depend on how many there are; the median is
    detached, so no gradient flows through the bandwidths.

    Args:
        bandwidth_factors: multipliers of the median distance, each > 0.
    """

    def __init__(self, bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS) -> None:
        super().__init__()
        _check_factors(bandwidth_factors)
        self.bandwidth_factors = tuple(float(factor) for factor in bandwidth_factors)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(N, D)`` student and ``(M, D)`` teacher embeddings.

        Raises:
            ValueError: the embeddings are not non-empty floating 2-D batches of one width.
        """
        return mmd2(student, teacher.detach(), self.bandwidth_factors)


class Discriminator(nn.Module):
    """MLP that scores embeddings as HR teacher (real, logit > 0) or LR student (fake).

    ``Linear(dim, hidden) -> LeakyReLU(0.2) -> Linear(hidden, 1)``; our
    choice of RKD's unspecified discriminator (the LeakyReLU slope is DCGAN's).

    Args:
        dim: embedding width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(N,)`` logits for an ``(N, dim)`` embedding.

        Raises:
            ValueError: ``embedding`` is not ``(N, dim)``.
        """
        if embedding.dim() != 2 or embedding.shape[1] != self.dim:
            raise ValueError(f"embedding must be (N, {self.dim}), got {tuple(embedding.shape)}")
        return self.layers(embedding).squeeze(1)


class AdversarialLoss(nn.Module):
    """Adversarial term of RKD: a discriminator with its own optimizer, and the student's GAN loss.

    RKD trains a discriminator "adversarially to shrink the gap between HR and
    LR inputs"; our reconstruction follows Goodfellow et al., "Generative
    Adversarial Nets", NeurIPS 2014, with the LR student as the generator.
    ``D`` (a :class:`Discriminator`) tells teacher HR embeddings (real) from
    student LR embeddings (fake)::

        L_D   = BCE(D(t), 1) + BCE(D(s), 0)       (discriminator_step)
        L_adv = BCE(D(s), 1)                      (forward)

    ``L_adv`` is the non-saturating generator loss: it gives the student a
    strong gradient where ``D`` confidently rejects it. Each BCE is
    :func:`~torch.nn.functional.binary_cross_entropy_with_logits`, averaged
    over the batch.

    The two are updated alternately in each training step, by the caller:

    1. ``discriminator_step(teacher_embedding, student_embedding)``: one
       update of ``D`` by its own optimizer, on detached inputs;
    2. ``lambda_adv * loss(student_embedding)`` added to the student's loss,
       through the just-updated ``D``, then the student's backward and step.

    ``D``'s parameters are parameters of this module, so :meth:`state_dict`
    saves them and ``.to()`` moves them, but they belong to ``self.optimizer``
    alone: leave this module's parameters out of the student's optimizer.
    :meth:`forward` uses ``D`` with detached parameters, so the student's
    backward never writes ``D``'s ``.grad``, and :meth:`discriminator_step`
    leaves it ``None``. Save :meth:`optimizer_state_dict` with the checkpoint
    to resume exactly. Under data-parallel training the updates of ``D`` run
    through the wrapper that :meth:`set_data_parallel` is given.

    Our choices: Adam with ``betas = (0.5, 0.999)`` and ``lr = 2e-4``, DCGAN's
    settings (Radford et al., ICLR 2016); one discriminator update per step.

    Args:
        dim: embedding width (the student's, adapted to the teacher's).
        hidden: the discriminator's hidden width.
        lr: the discriminator's learning rate.
    """

    def __init__(self, dim: int, hidden: int = 256, lr: float = 2e-4) -> None:
        super().__init__()
        self.discriminator = Discriminator(dim, hidden)
        self.optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999)
        )

    def set_data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run :meth:`discriminator_step` through ``wrap(discriminator)``: a
        :class:`~torch.nn.parallel.DistributedDataParallel` wrapper, which averages
        ``D``'s gradients over the processes, so every process's ``D`` stays the same.

        The wrapper is kept outside the module tree: the state dict is unchanged.
        """
        object.__setattr__(self, "_data_parallel", wrap(self.discriminator))

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Update ``D`` once on ``(N, dim)`` teacher (real) and student (fake) embeddings.

        Both inputs are detached. Gradients are enabled inside, so the step
        also runs in a ``torch.no_grad`` context. Under data-parallel training
        the gradients are averaged over the processes before the step
        (:meth:`set_data_parallel`). Returns ``L_D`` before the update (this
        process's batch), detached.

        Raises:
            ValueError: an input is not ``(N, dim)``.
        """
        with torch.enable_grad():
            discriminator = self.__dict__.get("_data_parallel", self.discriminator)
            real_logits = discriminator(real.detach())
            fake_logits = discriminator(fake.detach())
            loss = F.binary_cross_entropy_with_logits(
                real_logits, torch.ones_like(real_logits)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        # Drop the gradients now, so none is left for anything else to accumulate onto.
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def forward(self, fake: torch.Tensor) -> torch.Tensor:
        """Scalar generator loss ``BCE(D(fake), 1)`` for ``(N, dim)`` student embeddings.

        The gradient flows into ``fake`` only; ``D``'s parameters are detached.

        Raises:
            ValueError: ``fake`` is not ``(N, dim)``.
        """
        parameters = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits = torch.func.functional_call(self.discriminator, parameters, (fake,))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def optimizer_state_dict(self) -> dict:
        """The discriminator optimizer's state, to save with the checkpoint."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Restore the discriminator optimizer's state from :meth:`optimizer_state_dict`."""
        self.optimizer.load_state_dict(state)

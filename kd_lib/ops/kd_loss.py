"""Fused KD loss: temperature softmax, KL divergence and its gradient, for any class count.

Hinton KD's logit term (:class:`kd_lib.losses.KDLoss`), for ``(N, C)``
student logits ``s`` and teacher logits ``t`` at temperature ``T``, with
``a = s / T``, ``b = t / T`` and ``lse`` the log-sum-exp over the classes::

    L      = T^2 / N * sum_n KL(softmax(b_n) || softmax(a_n))
    KL_n   = sum_c p_t[n, c] * (b[n, c] - a[n, c]) - lse(b_n) + lse(a_n)
    dL/ds  = T / N * (softmax(a) - softmax(b))

The forward keeps the two log-sum-exps of each row, so the backward is one
elementwise pass. On CUDA one kernel computes a row's three running sums in a
single read of both logit rows (online softmax: the running maximum rescales
the sums as it grows), so no softmax or log-softmax tensor is ever written.
All arithmetic is float32 for float32, bfloat16 and float16 logits (float64
for float64 ones, by the reference on every device); the loss has that
dtype and the gradient the student's. The teacher's logits are constants: no
gradient flows into them. Logits must be finite.
"""

from __future__ import annotations

import torch

from kd_lib.ops import extension


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 for the others."""
    return torch.promote_types(logits.dtype, torch.float32)


def kd_loss_forward_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, lse(a), lse(b))`` by the formula of the module docstring, in PyTorch."""
    a = student.to(compute_dtype(student)) / temperature
    b = teacher.to(compute_dtype(student)) / temperature
    lse_student, lse_teacher = torch.logsumexp(a, dim=1), torch.logsumexp(b, dim=1)
    p_teacher = torch.exp(b - lse_teacher[:, None])
    row_kl = (p_teacher * (b - a)).sum(dim=1) - lse_teacher + lse_student
    return row_kl.sum() * (temperature**2 / student.shape[0]), lse_student, lse_teacher


def kd_loss_backward_reference(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                               lse_student: torch.Tensor, lse_teacher: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """``grad * dL/ds`` by the formula of the module docstring, in the student's dtype."""
    dtype = compute_dtype(student)
    p_student = torch.exp(student.to(dtype) / temperature - lse_student[:, None])
    p_teacher = torch.exp(teacher.to(dtype) / temperature - lse_teacher[:, None])
    scale = grad.to(dtype) * (temperature / student.shape[0])
    return (scale * (p_student - p_teacher)).to(student.dtype)


@torch.library.custom_op("kd_lib::kd_loss_forward", mutates_args=())
def _forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kd_loss_forward_reference(student, teacher, temperature)


@_forward.register_fake
def _(student, teacher, temperature):
    row = student.new_empty(student.shape[:1], dtype=compute_dtype(student))
    return student.new_empty((), dtype=compute_dtype(student)), row, torch.empty_like(row)


@_forward.register_kernel("cuda")
def _(student, teacher, temperature):
    if student.dtype == torch.float64 or not extension.load():
        return kd_loss_forward_reference(student, teacher, temperature)
    return tuple(torch.ops.kd_lib_cuda.kd_loss_forward(student.contiguous(), teacher.contiguous(),
                                                       temperature))


@torch.library.custom_op("kd_lib::kd_loss_backward", mutates_args=())
def _backward(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
              lse_student: torch.Tensor, lse_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return kd_loss_backward_reference(grad, student, teacher, lse_student, lse_teacher, temperature)


@_backward.register_fake
def _(grad, student, teacher, lse_student, lse_teacher, temperature):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@_backward.register_kernel("cuda")
def _(grad, student, teacher, lse_student, lse_teacher, temperature):
    if student.dtype == torch.float64 or not extension.load():
        return kd_loss_backward_reference(grad, student, teacher, lse_student, lse_teacher, temperature)
    return torch.ops.kd_lib_cuda.kd_loss_backward(grad, student.contiguous(), teacher.contiguous(),
                                                  lse_student, lse_teacher, temperature)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature = inputs
    _, lse_student, lse_teacher = output
    ctx.save_for_backward(student, teacher, lse_student, lse_teacher)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse_student, lse_teacher)


def _backward_formula(ctx, grad, _grad_lse_student, _grad_lse_teacher):
    student, teacher, lse_student, lse_teacher = ctx.saved_tensors
    grad_student = _backward(grad, student, teacher, lse_student, lse_teacher, ctx.temperature)
    return grad_student, None, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch, as a scalar.

    See the module docstring. The teacher's logits are detached.

    Raises:
        ValueError: the logits are not non-empty ``(N, C)`` of one shape and
            floating dtype, or ``temperature`` is not > 0.
    """
    if (student_logits.shape != teacher_logits.shape or student_logits.dim() != 2
            or not student_logits.numel() or not student_logits.is_floating_point()
            or teacher_logits.dtype != student_logits.dtype):
        raise ValueError(
            "student and teacher logits must both be non-empty floating (N, num_classes) of one "
            f"shape and dtype, got student {student_logits.dtype} {tuple(student_logits.shape)} and teacher "
            f"{teacher_logits.dtype} {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _forward(student_logits, teacher_logits.detach(), float(temperature))[0]

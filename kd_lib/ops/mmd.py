"""Multi-bandwidth Gaussian MMD^2 and its gradient, one weighted kernel sum over the pooled batch.

For ``x`` ``(N, D)``, ``y`` ``(M, D)``, bandwidths ``sigma_1 .. sigma_K`` and
the pooled batch ``z = [x; y]`` of ``P = N + M`` rows (Gretton et al., "A
Kernel Two-Sample Test", JMLR 2012, the biased V-statistic; the kernel the
mean over bandwidths, as :func:`kd_lib.losses.gaussian_mmd2`)::

    d_ij   = ||z_i - z_j||^2 = |z_i|^2 + |z_j|^2 - 2 z_i . z_j   (clamped at 0)
    k_ij   = 1/K * sum_k exp(-d_ij / (2 sigma_k^2))
    w_ij   = 1/N^2 (i, j in x), 1/M^2 (i, j in y), -1/(N M) (one in each)
    MMD^2  = sum_ij w_ij k_ij
    dMMD^2/dz_i = 4 * sum_j c_ij (z_i - z_j),   c_ij = w_ij dk_ij/dd_ij
                = 4 * (z_i * sum_j c_ij - (c z)_i)

(``w`` and ``k`` are symmetric, so each pair counts twice.) On CUDA the Gram
matrix ``z z^T`` comes from one matrix product and a single kernel reduces
``w_ij k_ij`` over every pair and bandwidth (forward) or writes ``c_ij``
(backward): one ``P x P`` matrix, never one per bandwidth as the reference
and the plain formula build. All arithmetic is float32 (float64 when an
input is float64, by the reference on every device); the loss has that dtype
and each gradient its input's. The bandwidths get no gradient.
"""

from __future__ import annotations

import torch

from kd_lib.ops import extension


def compute_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """float64 when ``x`` or ``y`` is float64, float32 otherwise."""
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


def _pair_terms(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z``, the per-bandwidth kernels ``exp(-d / (2 sigma_k^2))`` (K, P, P), ``1 / (2 sigma_k^2)``
    and ``w``, in :func:`compute_dtype`."""
    dtype = compute_dtype(x, y)
    z = torch.cat([x, y]).to(dtype)
    squared = z.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * z @ z.T).clamp_min(0)
    inverse = 0.5 / bandwidths.to(dtype).pow(2)
    kernels = torch.exp(-distances[None] * inverse[:, None, None])
    n, m = x.shape[0], y.shape[0]
    in_x = torch.arange(n + m, device=z.device) < n
    weights = torch.where(in_x[:, None] & in_x[None, :], 1 / n**2,
                          torch.where(~in_x[:, None] & ~in_x[None, :], 1 / m**2, -1 / (n * m)))
    return z, kernels, inverse, weights


def mmd2_forward_reference(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """MMD^2 by the formula of the module docstring, in PyTorch."""
    _, kernels, _, weights = _pair_terms(x, y, bandwidths)
    return (weights * kernels.mean(dim=0)).sum()


def mmd2_backward_reference(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            bandwidths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad * dMMD^2/dx`` and ``grad * dMMD^2/dy`` by the formula of the module docstring."""
    z, kernels, inverse, weights = _pair_terms(x, y, bandwidths)
    coefficients = -weights * (kernels * inverse[:, None, None]).mean(dim=0)
    grad_z = 4 * grad.to(z.dtype) * (z * coefficients.sum(dim=1, keepdim=True) - coefficients @ z)
    # copies: an operator's outputs must not share memory
    return grad_z[: x.shape[0]].to(x.dtype, copy=True), grad_z[x.shape[0]:].to(y.dtype, copy=True)


@torch.library.custom_op("kd_lib::mmd2_forward", mutates_args=())
def _forward(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    return mmd2_forward_reference(x, y, bandwidths)


@_forward.register_fake
def _(x, y, bandwidths):
    return x.new_empty((), dtype=compute_dtype(x, y))


@_forward.register_kernel("cuda")
def _(x, y, bandwidths):
    if compute_dtype(x, y) == torch.float64 or not extension.load():
        return mmd2_forward_reference(x, y, bandwidths)
    return torch.ops.kd_lib_cuda.mmd2_forward(x, y, bandwidths)


@torch.library.custom_op("kd_lib::mmd2_backward", mutates_args=())
def _backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return mmd2_backward_reference(grad, x, y, bandwidths)


@_backward.register_fake
def _(grad, x, y, bandwidths):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format))


@_backward.register_kernel("cuda")
def _(grad, x, y, bandwidths):
    if compute_dtype(x, y) == torch.float64 or not extension.load():
        return mmd2_backward_reference(grad, x, y, bandwidths)
    return tuple(torch.ops.kd_lib_cuda.mmd2_backward(grad, x, y, bandwidths))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_formula(ctx, grad):
    x, y, bandwidths = ctx.saved_tensors
    grad_x, grad_y = _backward(grad, x, y, bandwidths)
    return grad_x, grad_y, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def check_batches(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` and ``y`` are non-empty floating ``(N, D)`` and ``(M, D)``."""
    if (x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or not x.shape[0] or not y.shape[0]
            or not x.is_floating_point() or not y.is_floating_point()):
        raise ValueError("batches must be non-empty floating (N, D) and (M, D), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)} ({x.dtype} and {y.dtype})")


def multi_bandwidth_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 of ``x`` and ``y`` under the Gaussian kernel averaged over ``bandwidths``.

    See the module docstring; a scalar, with gradients for ``x`` and ``y``.

    Raises:
        ValueError: ``x`` and ``y`` are not non-empty floating ``(N, D)`` and
            ``(M, D)``, or ``bandwidths`` is not a non-empty 1-D tensor.
    """
    check_batches(x, y)
    if bandwidths.dim() != 1 or not bandwidths.numel():
        raise ValueError(
            f"bandwidths must be a non-empty 1-D tensor, got shape {tuple(bandwidths.shape)}")
    return _forward(x, y, bandwidths.detach().to(device=x.device, dtype=compute_dtype(x, y)))

"""Each CUDA kernel of kd_lib.ops against its PyTorch reference, on a GPU: shapes, dtypes, odd sizes,
gradients. Skipped where there is no GPU; on a GPU, kernels that fail to load fail every test."""

from __future__ import annotations

import pytest
import torch

from kd_lib.ops import extension, kd_loss, multi_bandwidth_mmd2, paired_resize
from kd_lib.ops.kd_loss import kd_loss_backward_reference, kd_loss_forward_reference
from kd_lib.ops.mmd import mmd2_backward_reference, mmd2_forward_reference
from kd_lib.ops.paired_resize import RESIZE_MODES, paired_resize_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: absolute tolerance of the outputs, by dtype (float32 differs from the reference by rounding only)
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Each entry within ``rel`` of itself plus ``rel`` times the largest expected magnitude: a
    tolerance scaled to the values (MMD gradients are ~1e-6 at d = 512), so that a backward
    returning zeros, or a few percent off, fails at every size."""
    scale = expected.abs().max().item()
    assert scale > 0, "the expected values are all zero: nothing to compare"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    if extension.disabled():
        pytest.fail(f"{extension.DISABLE_VARIABLE}=1: the GPU tests compare the kernels, unset it")
    if not extension.load():
        pytest.fail("the CUDA kernels did not load (see the warning above)")


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (224, 160)])
def test_paired_resize_matches_reference(mode: str, ratio: int, size: tuple) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, (3, *size, 3), dtype=torch.uint8, device="cuda", generator=generator)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for channels_last in (False, True):
            outputs = paired_resize(images, ratio, mode, MEAN, STD, dtype, channels_last)
            references = paired_resize_reference(images, ratio, mode, MEAN, STD, dtype, channels_last)
            for out, reference in zip(outputs, references):
                assert out.shape == reference.shape and out.dtype == dtype
                assert out.stride() == reference.stride()
                torch.testing.assert_close(out.float(), reference.float(), atol=ATOL[dtype], rtol=0)


def test_paired_resize_one_channel_and_one_image() -> None:
    images = torch.randint(0, 256, (1, 17, 9, 1), dtype=torch.uint8, device="cuda")
    for out, reference in zip(paired_resize(images, 2, "bicubic", (0.5,), (0.25,)),
                              paired_resize_reference(images, 2, "bicubic", (0.5,), (0.25,),
                                                      torch.float32, False)):
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 100), (16, 1000), (5, 4099), (4, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kd_loss_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    student = (4 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    teacher = (4 * torch.randn(shape, device="cuda")).to(dtype)
    loss = kd_loss(student, teacher, 4.0)
    loss.backward(torch.tensor(1.5, device="cuda"))
    ref_loss, lse_student, lse_teacher = kd_loss_forward_reference(student.detach(), teacher, 4.0)
    ref_grad = kd_loss_backward_reference(torch.tensor(1.5, device="cuda"), student.detach(), teacher,
                                          lse_student, lse_teacher, 4.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert student.grad.dtype == dtype
    torch.testing.assert_close(student.grad.float(), ref_grad.float(), rtol=2e-2 if dtype != torch.float32
                               else 1e-4, atol=1e-6)


def test_kd_loss_of_misaligned_logits() -> None:
    """Rows of whole 16-byte packs, but starting one float past an aligned address: one logit per
    access."""
    torch.manual_seed(0)
    student = torch.randn(16 * 1000 + 1, device="cuda")[1:].view(16, 1000).requires_grad_()
    teacher = torch.randn(16 * 1000 + 1, device="cuda")[1:].view(16, 1000)
    loss = kd_loss(student, teacher, 4.0)
    loss.backward()
    ref_loss, lse_student, lse_teacher = kd_loss_forward_reference(student.detach(), teacher, 4.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student.grad, kd_loss_backward_reference(
        torch.tensor(1.0, device="cuda"), student.detach(), teacher, lse_student, lse_teacher, 4.0),
        rtol=1e-4, atol=1e-8)


def launched_kernels(step) -> list[str]:
    """The names of the CUDA kernels that ``step()`` launched, from a profiler trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as trace:
        step()
        torch.cuda.synchronize()
    return [event.name for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def test_kd_loss_under_compile_uses_the_kernel() -> None:
    torch.manual_seed(0)
    student = torch.randn(32, 100, device="cuda", requires_grad=True)
    teacher = torch.randn(32, 100, device="cuda")
    compiled = torch.compile(lambda s: kd_loss(s, teacher, 4.0), fullgraph=True)
    results = []

    def step() -> None:
        value = compiled(student)
        results.append((value.detach(), *torch.autograd.grad(value, student)))

    step()  # compiles forward and backward outside the trace
    kernels = launched_kernels(step)
    assert any("kd_forward_kernel" in name for name in kernels), kernels
    assert any("kd_backward_kernel" in name for name in kernels), kernels
    value, grad = results[-1]
    ref_loss, lse_student, lse_teacher = kd_loss_forward_reference(student.detach(), teacher, 4.0)
    torch.testing.assert_close(value, ref_loss, rtol=1e-4, atol=1e-6)
    assert_close_to_scale(grad, kd_loss_backward_reference(torch.tensor(1.0, device="cuda"), student.detach(),
                                                           teacher, lse_student, lse_teacher, 4.0), 1e-4)


def cuda_operator_samples() -> list[tuple]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8, device="cuda")
    student = torch.randn(4, 10, device="cuda", requires_grad=True)
    x = torch.randn(5, 3, device="cuda", requires_grad=True)
    y = torch.randn(6, 3, device="cuda", requires_grad=True)
    return [
        (torch.ops.kd_lib.paired_resize.default, (images, 4, "bilinear", list(MEAN), list(STD), torch.float32, True)),
        (torch.ops.kd_lib.kd_loss_forward.default, (student, torch.randn(4, 10, device="cuda"), 2.0)),
        (torch.ops.kd_lib.mmd2_forward.default, (x, y, torch.tensor([0.5, 1.0], device="cuda"))),
    ]


@pytest.mark.parametrize("index", range(3))
def test_operators_pass_opcheck_on_cuda(index: int) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch with the CUDA kernels
    (torch.library.opcheck), and the kernel ran."""
    operator, args = cuda_operator_samples()[index]
    kernels = launched_kernels(lambda: torch.library.opcheck(operator, args))
    kernel = {0: "paired_resize_kernel", 1: "kd_forward_kernel", 2: "mmd_forward_kernel"}[index]
    assert any(kernel in name for name in kernels), kernels


@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (5, 7, 3), (33, 17, 129), (128, 128, 512), (257, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bandwidth_count", [1, 5])
def test_mmd2_matches_reference(n: int, m: int, d: int, dtype: torch.dtype, bandwidth_count: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    y = (torch.randn(m, d, device="cuda") + 0.3).to(dtype).requires_grad_()
    bandwidths = d**0.5 * torch.logspace(-1, 1, bandwidth_count, base=2.0, device="cuda")
    value = multi_bandwidth_mmd2(x, y, bandwidths)
    grads = torch.autograd.grad(value, (x, y), torch.tensor(0.5, device="cuda"))
    reference = mmd2_forward_reference(x.detach(), y.detach(), bandwidths)
    ref_grads = mmd2_backward_reference(torch.tensor(0.5, device="cuda"), x.detach(), y.detach(), bandwidths)
    torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)
    for grad, expected, tensor in zip(grads, ref_grads, (x, y)):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
        assert_close_to_scale(grad.float(), expected.float(), 2e-2 if dtype != torch.float32 else 1e-3)

"""The references of kd_lib.ops against their plain formulas, their gradients, and the operators'
registration (fake kernels, autograd, torch.compile), on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lib.ops import kd_loss, multi_bandwidth_mmd2, paired_resize
from kd_lib.ops.paired_resize import RESIZE_MODES, downsample, resize_taps

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(n: int = 2, height: int = 37, width: int = 53, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, channels), dtype=torch.uint8, generator=generator)


def plain_pair(batch: torch.Tensor, ratio: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize, and downsample with torch's own resamplers."""
    x = batch.permute(0, 3, 1, 2).double() / 255
    size = (x.shape[2] // ratio, x.shape[3] // ratio)
    if mode == "area":
        lr = F.adaptive_avg_pool2d(x, size)
    elif mode == "nearest":
        lr = F.interpolate(x, size=size, mode="nearest")
    else:
        lr = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (x - mean) / std, (lr - mean) / std


def apply_taps(x: torch.Tensor, rows: tuple, columns: tuple) -> torch.Tensor:
    """What the CUDA kernel computes from the taps: clamped indices, rows then columns."""
    def matrix(taps: tuple, size: int) -> torch.Tensor:
        start, weight = taps
        out = torch.zeros(len(start), size, dtype=torch.float64)
        index = (start[:, None].long() + torch.arange(weight.shape[1])).clamp(max=size - 1)
        return out.scatter_add_(1, index, weight.double())
    return torch.einsum("oh,nchw,pw->ncop", matrix(rows, x.shape[2]), x, matrix(columns, x.shape[3]))


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 7])
def test_resize_taps_reproduce_torch_resamplers(mode: str, ratio: int) -> None:
    x = images(height=37, width=53).permute(0, 3, 1, 2).double() / 255
    expected = plain_pair(images(height=37, width=53), ratio, mode)[1] * torch.tensor(STD).view(1, 3, 1, 1) \
        + torch.tensor(MEAN).view(1, 3, 1, 1)
    rows, columns = resize_taps(37, 37 // ratio, mode), resize_taps(53, 53 // ratio, mode)
    assert torch.allclose(apply_taps(x, rows, columns), expected.double(), atol=1e-6)
    for start, weight in (rows, columns):
        assert start.dtype == torch.int32 and weight.dtype == torch.float32
        assert torch.allclose(weight.sum(dim=1), torch.ones(len(start)), atol=1e-6)


def test_antialiased_taps_are_as_wide_as_the_filter() -> None:
    # bilinear: a triangle of half-width K, so 2K taps; bicubic twice that; area K; nearest 1
    widths = {mode: resize_taps(64, 16, mode)[1].shape[1] for mode in RESIZE_MODES}
    assert widths == {"bilinear": 8, "bicubic": 16, "area": 4, "nearest": 1}


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_paired_resize_reference_is_the_plain_formula(mode: str, ratio: int) -> None:
    batch = images()
    hr, lr = paired_resize(batch, ratio, mode, MEAN, STD)
    plain_hr, plain_lr = plain_pair(batch, ratio, mode)
    assert hr.shape == (2, 3, 37, 53) and lr.shape == (2, 3, 37 // ratio, 53 // ratio)
    assert hr.dtype == lr.dtype == torch.float32
    assert torch.allclose(hr.double(), plain_hr, atol=1e-5)
    assert torch.allclose(lr.double(), plain_lr, atol=1e-5)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_paired_resize_reference_is_the_float32_formula_to_the_bit(mode: str, channels_last: bool) -> None:
    # a change of the reference's arithmetic would move every table trained on the CPU
    batch = images()
    x = batch.permute(0, 3, 1, 2).float().mul_(1 / 255)
    shift, scale = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    hr, lr = paired_resize(batch, 4, mode, MEAN, STD, channels_last=channels_last)
    assert torch.equal(hr, (x - shift) / scale) and torch.equal(lr, (downsample(x, 4, mode) - shift) / scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paired_resize_dtype_and_channels_last(dtype: torch.dtype) -> None:
    batch = images(height=32, width=32)
    hr32, lr32 = paired_resize(batch, 4, "bilinear", MEAN, STD)
    hr, lr = paired_resize(batch, 4, "bilinear", MEAN, STD, dtype=dtype, channels_last=True)
    for out, reference in ((hr, hr32), (lr, lr32)):
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert torch.allclose(out.float(), reference, atol=2e-2, rtol=1e-2)


def test_paired_resize_one_channel() -> None:
    hr, lr = paired_resize(images(channels=1), 2, "area", (0.5,), (0.25,))
    assert hr.shape == (2, 1, 37, 53) and lr.shape == (2, 1, 18, 26)


@pytest.mark.parametrize("call, message", [
    (lambda: paired_resize(images().float(), 2, "bilinear", MEAN, STD), "uint8"),
    (lambda: paired_resize(images(channels=5), 2, "bilinear", (0.5,) * 5, (0.5,) * 5), "C <= 4"),
    (lambda: paired_resize(images(), 0, "bilinear", MEAN, STD), "ratio"),
    (lambda: paired_resize(images(), 38, "bilinear", MEAN, STD), "ratio"),
    (lambda: paired_resize(images(), 2, "lanczos", MEAN, STD), "mode"),
    (lambda: paired_resize(images(), 2, "bilinear", MEAN[:2], STD[:2]), "one value per channel"),
    (lambda: paired_resize(images(), 2, "bilinear", MEAN, (0.2, 0.0, 0.2)), "std > 0"),
    (lambda: paired_resize(images(), 2, "bilinear", MEAN, STD, dtype=torch.int32), "dtype"),
])
def test_paired_resize_rejects_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def plain_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return temperature**2 * F.kl_div(F.log_softmax(student / temperature, dim=1),
                                     F.log_softmax(teacher / temperature, dim=1),
                                     reduction="batchmean", log_target=True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 1000), (2, 50257)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_reference_is_the_plain_formula(shape: tuple, temperature: float) -> None:
    torch.manual_seed(0)
    student = (3 * torch.randn(shape)).requires_grad_()
    teacher = 3 * torch.randn(shape)
    loss = kd_loss(student, teacher, temperature)
    (grad,) = torch.autograd.grad(loss, student)
    plain_student = student.detach().clone().requires_grad_()
    plain = plain_kd(plain_student, teacher, temperature)
    (plain_grad,) = torch.autograd.grad(plain, plain_student)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.allclose(loss, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, plain_grad, rtol=1e-4, atol=1e-8)


def test_kd_loss_gradcheck_and_teacher_is_constant() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, 3.0), (student,))
    kd_loss(student, teacher, 3.0).backward()
    assert teacher.grad is None


def test_kd_loss_bfloat16_logits_compute_in_float32() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 100).bfloat16().requires_grad_(), torch.randn(8, 100).bfloat16()
    loss = kd_loss(student, teacher, 4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert torch.allclose(loss, plain_kd(student.detach().float(), teacher.float(), 4.0), rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0), r"\(2, 3\).*\(2, 4\)"),
    (lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 1.0), "dtype"),
    (lambda: kd_loss(torch.zeros(0, 3), torch.zeros(0, 3), 1.0), "non-empty"),
    (lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
])
def test_kd_loss_rejects_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Each entry within ``rel`` of itself plus ``rel`` times the largest expected magnitude: a
    tolerance scaled to the values, so that a gradient of zeros, or one a few percent off, fails
    however small the entries are."""
    scale = expected.abs().max().item()
    assert scale > 0, "the expected values are all zero: nothing to compare"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def plain_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """The three means of Gretton et al., one kernel matrix per bandwidth, through cdist."""
    def k(a, b):
        d = torch.cdist(a, b).pow(2)
        return torch.stack([torch.exp(-d / (2 * s**2)) for s in bandwidths]).mean(dim=0)
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (5, 7, 3), (33, 17, 129), (64, 64, 512)])
@pytest.mark.parametrize("bandwidths", [[1.0], [0.5, 1.0, 2.0, 4.0, 8.0]])
def test_mmd2_reference_is_the_plain_formula(n: int, m: int, d: int, bandwidths: list) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    y = (torch.randn(m, d) + 0.5).requires_grad_()
    scale = torch.tensor(bandwidths) * d**0.5
    value = multi_bandwidth_mmd2(x, y, scale)
    grads = torch.autograd.grad(value, (x, y))
    plain_x, plain_y = (t.detach().double().requires_grad_() for t in (x, y))
    plain = plain_mmd2(plain_x, plain_y, scale.double())
    plain_grads = torch.autograd.grad(plain, (plain_x, plain_y))
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), plain, atol=2e-6)
    for grad, expected in zip(grads, plain_grads):
        assert_close_to_scale(grad.double(), expected, 1e-4)


def test_mmd2_gradcheck_in_both_batches() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bandwidths = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: multi_bandwidth_mmd2(a, b, bandwidths), (x, y))


def test_mmd2_is_zero_for_equal_batches_and_positive_otherwise() -> None:
    x = torch.randn(6, 4)
    assert multi_bandwidth_mmd2(x, x.clone(), torch.ones(2)).abs() < 1e-6
    assert multi_bandwidth_mmd2(x, x + 3, torch.ones(2)) > 0.1


@pytest.mark.parametrize("call, message", [
    (lambda: multi_bandwidth_mmd2(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(1)), "D"),
    (lambda: multi_bandwidth_mmd2(torch.zeros(0, 3), torch.zeros(2, 3), torch.ones(1)), "non-empty"),
    (lambda: multi_bandwidth_mmd2(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(())), "bandwidths"),
])
def test_mmd2_rejects_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def operator_samples() -> list[tuple]:
    torch.manual_seed(0)
    student = torch.randn(4, 10, requires_grad=True)
    x, y = torch.randn(5, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    return [
        (torch.ops.kd_lib.paired_resize.default,
         (images(height=16, width=24), 4, "bilinear", list(MEAN), list(STD), torch.float32, True)),
        (torch.ops.kd_lib.kd_loss_forward.default, (student, torch.randn(4, 10), 2.0)),
        (torch.ops.kd_lib.mmd2_forward.default, (x, y, torch.tensor([0.5, 1.0]))),
    ]


@pytest.mark.parametrize("index", range(3))
def test_operators_pass_opcheck(index: int) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch (torch.library.opcheck)."""
    operator, args = operator_samples()[index]
    torch.library.opcheck(operator, args)


def test_operators_compile_into_one_graph() -> None:
    torch.manual_seed(0)
    batch = images(n=4, height=16, width=16)
    teacher_logits = torch.randn(4, 5)
    head = torch.nn.Linear(3 * 4 * 4, 5)

    def step(batch: torch.Tensor) -> torch.Tensor:
        hr, lr = paired_resize(batch, 4, "bilinear", MEAN, STD)
        logits = head(lr.flatten(1))
        return kd_loss(logits, teacher_logits, 4.0) + multi_bandwidth_mmd2(
            logits, teacher_logits, torch.tensor([1.0, 2.0])) + hr.mean()

    compiled = torch.compile(step, fullgraph=True)
    eager = step(batch)
    eager_grads = torch.autograd.grad(eager, head.weight)
    value = compiled(batch)
    grads = torch.autograd.grad(value, head.weight)
    assert torch.allclose(value, eager, atol=1e-6)
    assert torch.allclose(grads[0], eager_grads[0], atol=1e-6)

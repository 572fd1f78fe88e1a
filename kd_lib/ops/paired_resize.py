"""Paired resize: a uint8 NHWC batch in, the normalized HR batch and its downsampled LR batch out.

Both resolutions of a sample come from one crop (METHODS.md, "The setting"):
the HR image is the crop itself and the LR image the crop downsampled by the
ratio ``K``. With ``x`` the crop scaled to [0, 1] and ``mean``/``std`` per
channel::

    hr = (x - mean) / std
    lr = (downsample(x, K, mode) - mean) / std

``downsample`` is antialiased bilinear by default (a triangle filter as wide
as the ratio, as PIL and ``F.interpolate(antialias=True)``), or antialiased
bicubic, area (the average of each ``K x K`` block) or nearest. Every mode is
linear with weights summing to 1, so normalizing before or after resizing is
the same up to rounding.

Data loaders ship the uint8 crop only (a quarter of the float32 bytes) and the
pair is made on the training device: on CUDA by one kernel that reads each
input pixel once and writes both outputs, elsewhere by the reference below.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from kd_lib.ops import extension

ResizeMode = Literal["bilinear", "area", "bicubic", "nearest"]
RESIZE_MODES: tuple[str, ...] = ("bilinear", "area", "bicubic", "nearest")
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the CUDA kernel keeps one accumulator per channel in registers
MAX_CHANNELS = 4


def downsample(images: torch.Tensor, ratio: int, mode: ResizeMode = "bilinear") -> torch.Tensor:
    """``images`` (N, C, H, W) resized to (H // ratio, W // ratio) with ``mode``.

    Bilinear and bicubic are antialiased (a low-pass filter as wide as the
    ratio, as in PIL), area averages ``ratio x ratio`` blocks, nearest picks
    one pixel per block.
    """
    size = (images.shape[-2] // ratio, images.shape[-1] // ratio)
    if mode == "area":
        return F.adaptive_avg_pool2d(images, size)
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=size, mode=mode, antialias=antialias,
                         **({} if mode == "nearest" else {"align_corners": False}))


def paired_resize_reference(images: torch.Tensor, ratio: int, mode: str, mean: Sequence[float],
                            std: Sequence[float], dtype: torch.dtype, channels_last: bool
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch paired resize, on any device (see the module docstring)."""
    x = images.permute(0, 3, 1, 2).float().mul_(1 / 255)
    lr = downsample(x, ratio, mode)  # type: ignore[arg-type]
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(v.contiguous(memory_format=layout).sub_(shift).div_(scale).to(dtype) for v in (x, lr))


def _bilinear_filter(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


def _bicubic_filter(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def resize_taps(in_size: int, out_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D resampling of ``mode`` as taps: output ``o`` is ``sum_t weight[o, t] * in[start[o] + t]``.

    Returns ``start`` (int32, ``(out_size,)``) and ``weight`` (float32,
    ``(out_size, taps)``, zero past each output's own taps, whose indices may
    run past the input: the kernel clamps them). Reproduces PyTorch's own
    weights, so resampling rows then columns with them equals
    :func:`downsample`:

    - bilinear and bicubic with antialias (``aten/src/ATen/native/cpu/
      UpSampleKernel.cpp``, after PIL): with ``s = in / out``, the filter
      stretched by ``max(s, 1)`` and centred on ``s (o + 1/2)``, its support
      ``s`` (bilinear) or ``2 s`` (bicubic, ``a = -0.5``), normalized to sum 1;
    - area (``adaptive_avg_pool2d``): the mean of inputs
      ``floor(o in / out) .. ceil((o + 1) in / out) - 1``;
    - nearest: input ``floor(o * s)`` with ``s`` in float32, as PyTorch.
    """
    if mode == "nearest":
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        index = (torch.arange(out_size, dtype=torch.float32) * scale).floor().clamp(max=in_size - 1)
        return index.to(torch.int32), torch.ones(out_size, 1)
    rows: list[tuple[int, list[float]]] = []
    for o in range(out_size):
        if mode == "area":
            start, stop = o * in_size // out_size, -(-(o + 1) * in_size // out_size)
            rows.append((start, [1.0 / (stop - start)] * (stop - start)))
            continue
        scale = in_size / out_size
        support = (1.0 if mode == "bilinear" else 2.0) * max(scale, 1.0)
        filter_fn = _bilinear_filter if mode == "bilinear" else _bicubic_filter
        inverse = 1.0 / max(scale, 1.0)
        centre = scale * (o + 0.5)
        start = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        weights = [filter_fn((j + start - centre + 0.5) * inverse) for j in range(stop - start)]
        total = math.fsum(weights)
        rows.append((start, [w / total for w in weights] if total else weights))
    taps = max(len(w) for _, w in rows)
    start = torch.tensor([s for s, _ in rows], dtype=torch.int32)
    weight = torch.tensor([w + [0.0] * (taps - len(w)) for _, w in rows], dtype=torch.float32)
    return start, weight


@functools.lru_cache(maxsize=64)
def _device_taps(in_size: int, out_size: int, mode: str, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in resize_taps(in_size, out_size, mode))


@torch.library.custom_op("kd_lib::paired_resize", mutates_args=())
def _paired_resize(images: torch.Tensor, ratio: int, mode: str, mean: list[float], std: list[float],
                   dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return paired_resize_reference(images, ratio, mode, mean, std, dtype, channels_last)


@_paired_resize.register_fake
def _(images, ratio, mode, mean, std, dtype, channels_last):
    n, h, w, c = images.shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(images.new_empty((n, c, height, width), dtype=dtype).contiguous(memory_format=layout)
                 for height, width in ((h, w), (h // ratio, w // ratio)))


@_paired_resize.register_kernel("cuda")
def _(images, ratio, mode, mean, std, dtype, channels_last):
    if not extension.load():
        return paired_resize_reference(images, ratio, mode, mean, std, dtype, channels_last)
    h, w = images.shape[1:3]
    rows = _device_taps(h, h // ratio, mode, images.device)
    columns = _device_taps(w, w // ratio, mode, images.device)
    return tuple(torch.ops.kd_lib_cuda.paired_resize(images.contiguous(), *rows, *columns, mean, std,
                                                     dtype, channels_last))


def paired_resize(images: torch.Tensor, ratio: int, mode: ResizeMode, mean: Sequence[float],
                  std: Sequence[float], dtype: torch.dtype = torch.float32, channels_last: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hr, lr)`` for a uint8 ``(N, H, W, C)`` batch: ``(N, C, H, W)`` and ``(N, C, H // ratio, W // ratio)``.

    See the module docstring for the formula. The CUDA kernel runs for CUDA
    tensors (unless ``KD_LIB_DISABLE_CUDA_OPS=1``), the reference elsewhere;
    both are a ``kd_lib::paired_resize`` operator, so ``torch.compile``
    traces through them.

    Args:
        images: uint8 ``(N, H, W, C)``, ``C`` at most 4.
        ratio: the resolution ratio ``K`` >= 1, at most ``H`` and ``W``.
        mode: ``bilinear``, ``area``, ``bicubic`` or ``nearest``.
        mean, std: per channel, of the [0, 1] image; ``std`` > 0.
        dtype: of both outputs: float32, bfloat16 or float16.
        channels_last: both outputs in channels-last memory format.

    Raises:
        ValueError: an argument is outside what is listed above.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or not 1 <= images.shape[-1] <= MAX_CHANNELS:
        raise ValueError(f"images must be uint8 (N, H, W, C) with C <= {MAX_CHANNELS}, got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    if not isinstance(ratio, int) or not 1 <= ratio <= min(images.shape[1:3]):
        raise ValueError(f"ratio must be an integer from 1 to the image side "
                         f"{min(images.shape[1:3])}, got {ratio!r}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if not len(mean) == len(std) == images.shape[-1] or min(std) <= 0:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel "
                         f"({images.shape[-1]}), std > 0")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    return _paired_resize(images, ratio, mode, [float(m) for m in mean], [float(s) for s in std],
                          dtype, channels_last)

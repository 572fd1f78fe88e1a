"""Deployment cost of a model at its own input size: parameters, FLOPs, input bytes, latency.

None of these functions moves a model between devices; each leaves the
model's training flag as it found it.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Total number of parameter elements, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


def input_bytes(input_size: int, channels: int = 3) -> int:
    """Bytes of one 8-bit image sent to the model: ``channels * input_size**2``."""
    return channels * input_size**2


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block (``torch.set_num_threads``), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode()`` for the block; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _random_batch(
    model: nn.Module, batch_size: int, input_size: int, device: torch.device | str
) -> torch.Tensor:
    """A standard-normal ``batch_size x 3 x input_size x input_size`` batch in the model's dtype."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, 3, input_size, input_size, device=device, dtype=dtype)


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def count_gflops(model: nn.Module, input_size: int) -> float:
    """Forward GFLOPs for one ``3 x input_size x input_size`` image.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts
    2 FLOPs per multiply-add (a Conv2d gives ``2 * Cin * Cout * k * k * Hout *
    Wout``; torchvision ResNet-18 at 224 px gives 3.63), divided by 1e9.
    Runs in eval mode under inference mode on the model's own device.
    """
    batch = _random_batch(model, 1, input_size, _model_device(model))
    counter = FlopCounterMode(display=False)
    with _inference(model), counter:
        model(batch)
    return counter.get_total_flops() / 1e9


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels on a CUDA device; no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency_ms(
    model: nn.Module,
    input_size: int,
    batch_size: int,
    device: torch.device | str,
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Median wall time in ms of one forward on a random ``batch_size`` batch.

    ``model`` must already be on ``device``. ``warmup`` untimed forwards come
    first; each of the ``repeats`` timed forwards is bracketed by
    ``torch.cuda.synchronize()`` on CUDA so queued kernels are included.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    batch = _random_batch(model, batch_size, input_size, device)
    times_ms = []
    with _inference(model):
        for _ in range(warmup):
            model(batch)
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(batch)
            _synchronize(device)
            times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


def latency_profile(
    model: nn.Module,
    input_size: int,
    device: torch.device | str,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """``{"batch_<b>": ms}`` from :func:`measure_latency_ms` for each ``b`` in ``batch_sizes``."""
    return {
        f"batch_{b}": measure_latency_ms(model, input_size, b, device, warmup, repeats)
        for b in batch_sizes
    }

"""Data-parallel training over the processes that ``torchrun`` starts.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process
holds a full replica of the task and trains it on its share of each batch.
The training loop keeps the replicas bit-identical: it averages the
gradients over the processes before each optimizer step and copies process
0's buffers (BatchNorm running statistics) to the others after it, which is
what :class:`~torch.nn.parallel.DistributedDataParallel` does with its
default ``broadcast_buffers``. The DDP wrapper itself is not used: the CRKD
discriminator runs its own backward and optimizer step inside the task's
forward, and detection tasks leave some parameters without gradients, two
things the wrapper's gradient hooks do not allow.

Processes talk over NCCL on CUDA (each on ``cuda:LOCAL_RANK``) and over gloo
on the CPU. In a single process (no ``torchrun``) every function here is a
no-op, so results there are exactly those of a plain run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from kd_lib.config import check


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """The number of processes training together (1 outside ``torchrun``)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index among them (0 outside ``torchrun``)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is the one that writes checkpoints and outputs."""
    return rank() == 0


def init_from_env(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)`` of this process, joining torchrun's process group if needed.

    With ``WORLD_SIZE`` > 1 the group is created on the first call (NCCL for
    CUDA, gloo otherwise) and a CUDA ``device`` becomes ``cuda:LOCAL_RANK``,
    so that each process drives its own GPU; later calls return the same.
    Otherwise nothing is created and ``device`` is returned as given.

    Raises:
        ConfigError: naming ``device``, for a device no backend serves (mps).
    """
    if _world_size_from_env() <= 1:
        return 0, 1, device
    check(device.type in ("cpu", "cuda"), "device",
          f"data-parallel training (torchrun) runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """:func:`init_from_env` for the duration of a block, leaving the group after it if the block joined it.

    Yields this process's device.
    """
    joins = _world_size_from_env() > 1 and not dist.is_initialized()
    _, _, device = init_from_env(device)
    try:
        yield device
    finally:
        if joins and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (after the main process wrote something the others rely on)."""
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _coalesced(tensors: Iterable[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run ``collective`` in place on one flat copy of ``tensors`` per device and dtype, and copy back.

    One collective per group instead of one per tensor: a model has hundreds
    of small tensors, and each collective has a fixed latency.
    """
    groups = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.device, tensor.dtype)].append(tensor)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            collective(flat)
            for tensor, part in zip(group, flat.split([t.numel() for t in group])):
                tensor.copy_(part.view_as(tensor))


def _all_reduce_mean(flat: torch.Tensor) -> None:
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())


def _broadcast_from_main(flat: torch.Tensor) -> None:
    dist.broadcast(flat, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes, before an optimizer step.

    A parameter that got no gradient on some processes (a branch their
    batches did not reach) counts as zero there; one that got none anywhere
    keeps ``None``, so the optimizer skips it as it would in one process.
    """
    if world_size() == 1:
        return
    params = list(params)
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    reduced = [p for p, present in zip(params, has_grad.tolist()) if present]
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _coalesced([p.grad for p in reduced], _all_reduce_mean)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy the main process's buffers (BatchNorm running statistics, counters) to every process.

    Each process updates its BatchNorm statistics on its own share of the
    batch; taking process 0's after each step keeps the replicas identical.
    """
    if world_size() > 1:
        _coalesced(list(module.buffers()), _broadcast_from_main)


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy the main process's parameters and buffers to every process (once, before training)."""
    if world_size() > 1:
        _coalesced([*module.parameters(), *module.buffers()], _broadcast_from_main)


def mean_over_processes(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each scalar of ``values`` averaged over the processes (``values`` itself in one process).

    The loop reports and checks the mean loss of the whole batch, so that
    every process logs the same numbers and stops together on a NaN.
    """
    if world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.detach().reshape(()).to(_collective_device(), torch.float64) for v in values])
    _all_reduce_mean(stacked)
    return list(stacked.unbind())


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal if any process received one (the highest number if several), else None.

    Processes get a signal at slightly different steps; agreeing on it each
    step makes them all checkpoint and stop after the same one.
    """
    if world_size() == 1:
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def parameters_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of ``module``'s state dict: equal digests, identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()

"""Data-parallel training over the processes that ``torchrun`` starts.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process
holds a full replica of the task and trains it on its share of each batch.
The replicas are kept identical by
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP), which
:func:`data_parallel` wraps around the task's trained parameters and buffers:
it averages the gradients over the processes in buckets while the backward
runs, and copies process 0's buffers (BatchNorm running statistics) to the
others at the start of each forward (its default ``broadcast_buffers``). The
frozen teacher stays outside it. The CRKD discriminator, which takes its own
backward and optimizer step inside the task's forward, gets a DDP wrapper of
its own, and detection tasks, which leave some parameters without gradients,
have DDP look for those after each forward (``find_unused_parameters``);
other tasks use the same parameters at every step (``static_graph``).
The loop synchronises with the host only every few steps, through
:func:`agree` (the steps' losses, averaged over the processes, and any stop
signal).

Processes talk over NCCL on CUDA (each on ``cuda:LOCAL_RANK``) and over gloo
on the CPU. In a single process (no ``torchrun``) nothing is wrapped and
every collective here is skipped, so results there are exactly those of a
plain run.
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


def _broadcast_from_main(flat: torch.Tensor) -> None:
    dist.broadcast(flat, src=0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy the main process's buffers (BatchNorm running statistics, counters) to every process.

    Each process updates its BatchNorm statistics on its own share of the
    batch. :func:`data_parallel`'s wrapper copies process 0's at the start of
    each forward; the loop also calls this at each epoch's end, so that
    validation and the replicas after the last step agree too.
    """
    if world_size() > 1:
        _coalesced(list(module.buffers()), _broadcast_from_main)


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy the main process's parameters and buffers to every process (once, before training)."""
    if world_size() > 1:
        _coalesced([*module.parameters(), *module.buffers()], _broadcast_from_main)


class _Trained(torch.nn.Module):
    """What the task's DDP wrapper holds: the task's trained parameters and buffers (named as in the
    task, dots made ``__``), with the task's ``forward``.

    The task itself is not a submodule, so DDP neither broadcasts the frozen
    teacher nor hooks the discriminators that step on their own.
    """

    def __init__(self, task: torch.nn.Module, parameters: list[torch.nn.Parameter],
                 buffers: list[torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "task", task)
        names = {id(t): name.replace(".", "__") for name, t in [*task.named_parameters(), *task.named_buffers()]}
        for index, parameter in enumerate(parameters):
            self.register_parameter(names.get(id(parameter), f"parameter{index}"), parameter)
        for index, buffer in enumerate(buffers):
            self.register_buffer(names.get(id(buffer), f"buffer{index}"), buffer)

    def forward(self, *args, **kwargs):
        return self.task(*args, **kwargs)


def data_parallel(task: torch.nn.Module, parameters: list[torch.nn.Parameter], device: torch.device,
                  find_unused: bool) -> torch.nn.Module:
    """What the loop calls for a step: ``task`` itself in one process, else a DDP wrapper of it.

    The wrapper (:class:`~torch.nn.parallel.DistributedDataParallel`) holds
    ``parameters`` (the optimizer's) and the task's buffers but those of its
    ``teacher`` and of the modules that update themselves, and calls
    ``task``'s forward: the parameters' gradients are averaged over the
    processes in buckets during the backward, and process 0's buffers are
    copied to the others at the start of each forward. Every submodule with a
    ``set_data_parallel(wrap)`` method (the CRKD discriminator) is given
    ``wrap``, which makes a DDP wrapper of a module of its own; its updates run
    through it. ``find_unused``: some parameters may get no gradient on some
    steps (detection), so the wrapper looks for them after each forward;
    otherwise the parameters a step uses are taken to be the same at every
    step (``static_graph``), which also allows some never to be used.
    The task's own modules and state dicts are untouched.
    """
    if world_size() == 1:
        return task
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    own = [m for m in task.modules() if m is not task and callable(getattr(type(m), "set_data_parallel", None))]
    for module in own:
        module.set_data_parallel(lambda m: DistributedDataParallel(m, device_ids=device_ids))
    teacher = getattr(task, "teacher", None)
    skipped = {id(b) for m in [*own, *([teacher] if teacher is not None else [])] for b in m.buffers()}
    buffers = [b for b in task.buffers() if id(b) not in skipped]
    return DistributedDataParallel(_Trained(task, parameters, buffers), device_ids=device_ids,
                                   find_unused_parameters=find_unused, static_graph=not find_unused)


def agree(values: torch.Tensor, flags: list[bool]) -> tuple[list[float], list[bool]]:
    """``values`` averaged over the processes, and whether any process raised each of ``flags``:
    one collective and one copy to the host (none of either in one process but the copy).

    The loop's only synchronisation, every few steps: the steps' losses, and
    the stop signals received since.
    """
    packed = torch.cat([values.detach().reshape(-1),
                        torch.tensor(flags, dtype=values.dtype, device=values.device)])
    if world_size() > 1:
        packed = packed.to(_collective_device())
        dist.all_reduce(packed)
        packed[:values.numel()].div_(dist.get_world_size())
    host = packed.tolist()
    return host[:values.numel()], [flag > 0 for flag in host[values.numel():]]


def parameters_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of ``module``'s state dict: equal digests, identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()

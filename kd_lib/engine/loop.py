"""The one training loop of every training stage, classification and detection.

``fit`` trains a task: a :class:`~kd_lib.distill.distiller.Distiller` or a
detection task of :mod:`kd_lib.distill.detection`, that is any module with
``forward(hr, lr, targets) -> (loss, terms)``, a ``student``,
``optimized_parameters``, ``set_progress`` and
``trainable_state_dict``/``load_trainable_state_dict``. The training set
yields ``(image, target)`` items, the image uint8 ``(H, W, 3)``, and has a
``pairing`` (:class:`~kd_lib.data.transforms.PairedResize`): each batch of
images is moved to the device as uint8 and paired there into the ``hr`` and
``lr`` batches (:func:`paired_batches`); ``targets`` is the batch of targets
(class labels, or per-image box dictionaries through a ``collate_fn``), moved
to the device:

- seeded: model init, batch order and every crop come from ``settings.seed``;
- bf16 autocast on CUDA devices that support it, full precision elsewhere;
- SGD with a per-step cosine or step schedule, optional gradient-norm clipping;
- a checkpoint (``last.pt``) every ``checkpoint_every`` steps, at each epoch's
  end and on SIGTERM/SIGINT, after which :class:`TrainingInterrupted` is
  raised; an existing ``last.pt`` is resumed from, mid-epoch included;
- a progress bar per epoch and one metrics row per epoch (train loss and its
  terms, learning rate, the ``validate`` callable's metrics prefixed ``val_``,
  seconds), also written to ``metrics.parquet`` beside the checkpoint after
  every epoch;
- data-parallel under ``torchrun`` (:mod:`kd_lib.engine.distributed`): each
  process trains on its slice of every batch (``batch_size`` stays the whole
  batch), gradients are averaged before each step and process 0's buffers
  copied after it, so the replicas stay identical; the logged loss is the
  mean over the processes, only process 0 writes, and every process resumes
  from the same checkpoint and stops at the same step on a signal.

The model kept is the last epoch's: the validation split is watched, never
used to pick a checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from kd_lib.config import check
from kd_lib.data.sampler import EpochBatchSampler
from kd_lib.engine import distributed
from kd_lib.engine.settings import TrainSettings
from kd_lib.io import checkpoint
from kd_lib.io.fs import exists, join, write_bytes

CHECKPOINT = "last.pt"
METRICS = "metrics.parquet"
#: ``validate(student, device) -> {metric: value}``, run after every epoch.
Validate = Callable[[torch.nn.Module, torch.device], dict[str, float]]


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {where}")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing was saved for that step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device has fast bf16 (CUDA), else a no-op."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StopOnSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(params, settings: TrainSettings, lr_scales: dict[int, float] | None = None
                    ) -> torch.optim.Optimizer:
    """SGD on ``params``, each at ``lr`` times its factor in ``lr_scales`` (parameter id -> factor, 1 if absent)."""
    groups: dict[float, list] = {}
    for p in params:
        groups.setdefault((lr_scales or {}).get(id(p), 1.0), []).append(p)
    return torch.optim.SGD([{"params": ps, "lr": settings.lr * scale} for scale, ps in sorted(groups.items())],
                           lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def build_scheduler(optimizer, settings: TrainSettings, steps_per_epoch: int):
    """Per-step schedule: cosine to zero over the run, or x``gamma`` at each milestone epoch."""
    total = settings.epochs * steps_per_epoch
    if settings.schedule == "cosine":
        lam = lambda step: 0.5 * (1 + math.cos(math.pi * step / total))  # noqa: E731
    else:
        lam = lambda step: settings.gamma ** sum(step >= m * steps_per_epoch for m in settings.milestones)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lam)


def write_metrics(rows: list[dict], uri: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    write_bytes(uri, buffer.getvalue())


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in ``batch`` (nested in tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def paired_batches(batches: Iterable[tuple[torch.Tensor, Any]],
                   pairing: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """``(hr, lr, targets)`` on ``device`` for each ``(images, targets)`` batch of a loader.

    ``images`` (uint8 ``(N, H, W, 3)``) are moved to ``device`` and made into
    the HR and LR batches there by ``pairing`` (a dataset's
    :class:`~kd_lib.data.transforms.PairedResize`); ``targets`` (labels, or a
    list of box dictionaries) are moved with :func:`to_device`.
    """
    for images, targets in batches:
        hr, lr = pairing(images.to(device, non_blocking=True))
        yield hr, lr, to_device(targets, device)


def _describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"val {k} {100 * v:.1f}%" for k, v in metrics.items() if isinstance(v, float))


def _check_split(batch_size: int, world: int) -> None:
    """Raise ConfigError naming ``batch_size`` unless it splits into per-process batches of at least 2
    (in one process the settings' own check already holds)."""
    check(world == 1 or (batch_size % world == 0 and batch_size // world >= 2), "batch_size",
          f"{batch_size} is the whole batch of the {world} processes: it must split into equal batches "
          f"of at least 2 (BatchNorm), so use a multiple of {world} of at least {2 * world}")


def fit(task: torch.nn.Module, train_set, settings: TrainSettings, checkpoint_dir: str,
        validate: Validate, desc: str = "train", collate_fn: Callable | None = None) -> list[dict]:
    """Train ``task`` and return its metrics rows (see the module docstring)."""
    rank, world, device = distributed.init_from_env(resolve_device(settings.device))
    _check_split(settings.batch_size, world)
    main = distributed.is_main()
    task.to(device)
    params = task.optimized_parameters()
    optimizer = build_optimizer(params, settings, getattr(task, "lr_scales", None))
    steps_per_epoch = len(EpochBatchSampler(len(train_set), settings.batch_size, settings.seed, 0))
    scheduler = build_scheduler(optimizer, settings, steps_per_epoch)
    ckpt_uri = join(checkpoint_dir, CHECKPOINT)
    epoch, start_batch, step, rows, sums = 0, 0, 0, [], defaultdict(float)
    if exists(ckpt_uri):
        state = checkpoint.load(ckpt_uri)
        task.load_trainable_state_dict(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, start_batch, step, rows = state["epoch"], state["batch"], state["step"], state["rows"]
        sums.update(state["sums"])
        print(f"{desc}: resumed from {ckpt_uri} at epoch {epoch + 1}, batch {start_batch}",
              file=sys.stderr, flush=True)
    distributed.broadcast_state(task)
    torch.manual_seed(settings.seed + step)  # dropout and other in-model randomness

    def save(next_epoch: int, next_batch: int, with_metrics: bool = False) -> None:
        """Checkpoint (and the metrics rows so far) from the main process; every process waits for it."""
        if main:
            checkpoint.save({"task": task.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": next_epoch,
                             "batch": next_batch, "step": step, "rows": rows, "sums": dict(sums)},
                            ckpt_uri)
            if with_metrics:
                write_metrics(rows, join(checkpoint_dir, METRICS))
        distributed.barrier()

    with StopOnSignal() as stop:
        while epoch < settings.epochs:
            started = time.monotonic()
            sampler = EpochBatchSampler(len(train_set), settings.batch_size, settings.seed, epoch, start_batch,
                                        rank, world)
            task.train()
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                                 num_workers=settings.num_workers,
                                                 pin_memory=device.type == "cuda")
            bar = tqdm(loader, total=len(sampler),
                       desc=f"{desc} {epoch + 1}/{settings.epochs}", unit="batch",
                       mininterval=0.5 if sys.stderr.isatty() else 10, dynamic_ncols=True, disable=not main)
            batches = paired_batches(bar, train_set.pairing, device)
            for batch, (hr, lr_images, targets) in enumerate(batches, start=start_batch):
                task.set_progress(step / steps_per_epoch)
                with autocast(device, settings.amp):
                    loss, terms = task(hr, lr_images, targets)
                batch_loss, *term_values = distributed.mean_over_processes([loss, *terms.values()])
                terms = dict(zip(terms, term_values))
                if not torch.isfinite(batch_loss):
                    values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                    raise NonFiniteLossError(
                        f"{desc}: loss is {batch_loss.item()} at epoch {epoch + 1}, batch {batch} ({values}); "
                        f"the last good checkpoint is {ckpt_uri}; lower lr (now {settings.lr}), "
                        "set grad_clip_norm, or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(params)
                if settings.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                distributed.broadcast_buffers(task)
                step += 1
                sums["loss"] += batch_loss.item()
                for name, value in terms.items():
                    sums[name] += value.item()
                bar.set_postfix(loss=f"{batch_loss.item():.3f}", refresh=False)
                signum = distributed.agreed_signal(stop.signum)
                if signum is not None:
                    save(epoch, batch + 1)
                    bar.close()
                    raise TrainingInterrupted(signum, ckpt_uri)
                if step % settings.checkpoint_every == 0:
                    save(epoch, batch + 1)
            bar.close()
            metrics = validate(task.student, device)
            rows.append({"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                         **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()},
                         **{f"val_{k}": v for k, v in metrics.items()},
                         "seconds": time.monotonic() - started})
            if main:
                print(f"{desc} epoch {epoch + 1}/{settings.epochs}: loss {rows[-1]['train_loss']:.4f}, "
                      f"{_describe(metrics)}", file=sys.stderr, flush=True)
            epoch, start_batch, sums = epoch + 1, 0, defaultdict(float)
            save(epoch, 0, with_metrics=True)
    if world > 1:
        # one write, so that the processes' lines cannot interleave
        sys.stderr.write(f"{desc}: rank {rank}/{world} final parameter digest {distributed.parameters_digest(task)}\n")
        sys.stderr.flush()
    return rows

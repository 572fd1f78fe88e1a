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

- seeded: model init (by the stage), batch order and every crop come from
  ``settings.seed``; so does in-model randomness (dropout), drawn from the
  global generators, which a run seeds with ``settings.seed`` when it starts
  and a resumed run restores from the checkpoint: a run stopped and resumed
  ends with the weights of an uninterrupted one, bit for bit;
- bf16 autocast on CUDA devices that support it, full precision elsewhere;
  with ``channels_last``, the task's weights and both input batches in the
  channels-last memory format (the pairing writes it directly);
- SGD with a per-step cosine or step schedule, optional gradient-norm clipping;
- a checkpoint (``last.pt``: the task's trainable state, the optimizer, the
  schedule, the :class:`LoopState` and the RNG states) every
  ``checkpoint_every`` steps, at each epoch's end and on SIGTERM/SIGINT, after
  which :class:`TrainingInterrupted` is raised; an existing ``last.pt`` is
  resumed from, mid-epoch included (an earlier one where it is damaged:
  :func:`kd_lib.io.checkpoint.load_latest`);
- no synchronisation with the host inside a step: each step's loss and terms
  stay on the device until the loop syncs, every :data:`SYNC_EVERY` steps,
  before every checkpoint and at each epoch's end; there a non-finite loss
  raises :class:`NonFiniteLossError` naming its epoch and batch (the steps
  taken since are never checkpointed), and a stop signal is acted on (in one
  process after any step);
- a progress bar per epoch (its loss updated at each sync), and at its end
  one progress line (loss and its terms, learning rate, training images per
  second, validation metrics) and one metrics row (the same, the terms
  prefixed ``train_``, the metrics ``val_``, ``seconds`` with validation and
  ``training_seconds`` without), also written to ``metrics.parquet`` beside
  the checkpoint after every epoch;
- data-parallel under ``torchrun`` (:mod:`kd_lib.engine.distributed`): each
  process trains on its slice of every batch (``batch_size`` stays the whole
  batch) through a DistributedDataParallel wrapper of the task, which
  averages the gradients during the backward and copies process 0's buffers
  at the start of each forward (and the loop once more at each epoch's end),
  so the replicas stay identical; the logged loss is the mean over the
  processes, only process 0 writes, and every process resumes from the same
  checkpoint and stops at the same step on a signal, agreed on at a sync.

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
from dataclasses import asdict, dataclass, field, replace
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
from kd_lib.io.fs import join, write_bytes

CHECKPOINT = "last.pt"
METRICS = "metrics.parquet"
#: Steps between the loop's synchronisations with the host (and, under ``torchrun``, between the
#: processes): the non-finite loss check, the agreement on a stop signal and the progress bar's loss.
#: One also comes before every checkpoint and at each epoch's end.
SYNC_EVERY = 10
#: Where a warm-up starts, as a fraction of lr.
WARMUP_FACTOR = 0.001
#: ``validate(student, device) -> {metric: value}``, run after every epoch.
Validate = Callable[[torch.nn.Module, torch.device], dict[str, float]]


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {where}")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing was saved from that step on."""


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
    """Per-step schedule: cosine to zero over the run, or x``gamma`` at each milestone epoch; times a
    linear warm-up from ``WARMUP_FACTOR`` to 1 over the first ``warmup_steps`` steps (torchvision's
    detection reference warms up the same way, from 0.001, over 1000 iterations)."""
    total = settings.epochs * steps_per_epoch
    if settings.schedule == "cosine":
        base = lambda step: 0.5 * (1 + math.cos(math.pi * step / total))  # noqa: E731
    else:
        base = lambda step: settings.gamma ** sum(step >= m * steps_per_epoch for m in settings.milestones)  # noqa: E731

    def lam(step: int) -> float:
        warm = WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / settings.warmup_steps \
            if step < settings.warmup_steps else 1.0
        return warm * base(step)

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


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The states of the generators that in-model randomness (dropout) draws from: the CPU's, and
    ``device``'s when it is a GPU. Data order and crops do not draw from them (see
    :mod:`kd_lib.data.sampler`)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_states` returned (a GPU state only onto a GPU)."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@dataclass
class LoopState:
    """Where a run stands: checkpointed whole, with the task, the optimizer, the schedule and the RNG states."""

    epoch: int = 0  #: epochs finished (the index of the current one)
    batch: int = 0  #: batches of the current epoch finished
    step: int = 0  #: optimizer steps taken
    rows: list[dict] = field(default_factory=list)  #: one metrics row per finished epoch
    sums: dict[str, float] = field(default_factory=dict)  #: the current epoch's loss and terms, summed


class _Run:
    """One call of :func:`fit`: what it trains with, and its :class:`LoopState`."""

    def __init__(self, task: torch.nn.Module, train_set, settings: TrainSettings, checkpoint_dir: str,
                 validate: Validate, desc: str, collate_fn: Callable | None):
        self.rank, self.world, self.device = distributed.init_from_env(resolve_device(settings.device))
        _check_split(settings.batch_size, self.world)
        self.task, self.train_set, self.settings, self.validate = task.to(self.device), train_set, settings, validate
        self.pairing = train_set.pairing
        if settings.channels_last:
            self.task.to(memory_format=torch.channels_last)
            self.pairing = replace(self.pairing, channels_last=True)
        self.model = self.task  # what a step calls: the task, or its data-parallel wrapper (start)
        self.desc, self.collate_fn = desc, collate_fn
        self.checkpoint_dir, self.uri = checkpoint_dir, join(checkpoint_dir, CHECKPOINT)
        self.params = task.optimized_parameters()
        self.optimizer = build_optimizer(self.params, settings, getattr(task, "lr_scales", None))
        self.steps_per_epoch = len(EpochBatchSampler(len(train_set), settings.batch_size, settings.seed, 0))
        self.scheduler = build_scheduler(self.optimizer, settings, self.steps_per_epoch)
        self.state = LoopState()
        # the loss and terms of the steps since the last sync, one row each, on the device
        self.names: list[str] = []
        self.window: torch.Tensor | None = None
        self.pending = 0
        self.last_loss = math.nan

    def start(self) -> None:
        """Resume from the checkpoint if there is one, else seed in-model randomness from the settings;
        then make every process's replica the main one's and wrap the task for data-parallel training.

        Under ``torchrun`` every process resumes from the main process's checkpoint, RNG states
        included: they draw alike (one seed, one model, equal shares of each batch).
        """
        latest = checkpoint.load_latest(self.uri)  # an earlier one if last.pt is damaged
        if latest is not None:
            saved, source = latest
            self.task.load_trainable_state_dict(saved["task"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = LoopState(**saved["loop"])
            set_rng_states(saved["rng"], self.device)
            print(f"{self.desc}: resumed from {source} at epoch {self.state.epoch + 1}, batch {self.state.batch}",
                  file=sys.stderr, flush=True)
        else:
            torch.manual_seed(self.settings.seed)
        distributed.broadcast_state(self.task)
        self.model = distributed.data_parallel(self.task, self.params, self.device,
                                               not getattr(self.task, "same_parameters_every_step", False))

    def save(self, with_metrics: bool = False) -> None:
        """Checkpoint (and the metrics rows so far) from the main process; every process waits for it."""
        if distributed.is_main():
            checkpoint.save_latest({"task": self.task.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(), "loop": asdict(self.state),
                             "rng": rng_states(self.device)}, self.uri)
            if with_metrics:
                write_metrics(self.state.rows, join(self.checkpoint_dir, METRICS))
        distributed.barrier()

    def step(self, hr: torch.Tensor, lr_images: torch.Tensor, targets: Any, stop: StopOnSignal) -> None:
        """One optimizer step on one batch, its loss and terms kept on the device until the next
        :meth:`sync`."""
        state = self.state
        self.task.set_progress(state.step / self.steps_per_epoch)
        with autocast(self.device, self.settings.amp):
            loss, terms = self.model(hr, lr_images, targets)
        self.record({"loss": loss, **terms}, stop)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        state.step, state.batch = state.step + 1, state.batch + 1

    def record(self, values: dict[str, torch.Tensor], stop: StopOnSignal) -> None:
        """Copy a step's scalar loss and terms into the next row of the window, on the device."""
        names = list(values)
        if names != self.names:
            if self.pending:
                self.sync(stop)  # the rows so far are of other names (every process sees the same)
            dtype = torch.float32 if self.device.type == "mps" else torch.float64  # mps has no float64
            self.names, self.window = names, torch.empty(SYNC_EVERY, len(names), dtype=dtype, device=self.device)
        self.window[self.pending].copy_(torch.stack([v.detach().reshape(()).to(self.window.dtype)
                                                     for v in values.values()]))
        self.pending += 1

    def sync(self, stop: StopOnSignal) -> int | None:
        """The loop's synchronisation: every :data:`SYNC_EVERY` steps, before each checkpoint and at the
        epoch's end.

        Brings the pending steps' losses and terms to the host (under ``torchrun`` their means over the
        processes), raises :class:`NonFiniteLossError` for the first non-finite loss among them, adds
        them to the epoch's sums, and returns the stop signal any process received (the highest number if
        several), so that all stop after the same step.
        """
        state, rows = self.state, self.pending
        window = self.window[:rows] if rows else torch.zeros(0)
        values, raised = distributed.agree(window, [stop.signum == s for s in StopOnSignal.SIGNALS])
        self.pending = 0
        width = len(self.names)
        for row in range(rows):
            named = dict(zip(self.names, values[row * width:(row + 1) * width], strict=True))
            if not math.isfinite(named["loss"]):
                batch = state.batch - rows + row
                split = ", ".join(f"{k}={v:.4g}" for k, v in named.items() if k != "loss")
                raise NonFiniteLossError(
                    f"{self.desc}: loss is {named['loss']} at epoch {state.epoch + 1}, batch {batch} ({split}; "
                    f"found after batch {state.batch - 1}, nothing saved since); the last good checkpoint is {self.uri}; "
                    f"lower lr (now {self.settings.lr}), set grad_clip_norm, or check the data")
            for name, value in named.items():
                state.sums[name] = state.sums.get(name, 0.0) + value
            self.last_loss = named["loss"]
        return max((s for s, r in zip(StopOnSignal.SIGNALS, raised) if r), default=None)

    def epoch(self, stop: StopOnSignal) -> None:
        """The rest of the current epoch: its steps, with a :meth:`sync` every :data:`SYNC_EVERY` steps,
        checkpoints every ``checkpoint_every`` steps and on a signal, then validation, the epoch's metrics row
        and its progress line."""
        settings, state = self.settings, self.state
        sampler = EpochBatchSampler(len(self.train_set), settings.batch_size, settings.seed, state.epoch,
                                    state.batch, self.rank, self.world, getattr(self.train_set, "blocks", ()))
        # a generator of its own: the loader draws its workers' base seed from it, not from the
        # generator dropout draws from
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate_fn,
                                             num_workers=settings.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(settings.seed))
        bar = tqdm(loader, total=len(sampler), desc=f"{self.desc} {state.epoch + 1}/{settings.epochs}",
                   unit="batch", mininterval=0.5 if sys.stderr.isatty() else 10, dynamic_ncols=True,
                   disable=not distributed.is_main())
        self.task.train()
        started, steps = time.monotonic(), 0
        with bar:  # closed on an error too: its line ends before the error is printed
            for hr, lr_images, targets in paired_batches(bar, self.pairing, self.device):
                self.step(hr, lr_images, targets, stop)
                steps += 1
                checkpoint_due = state.step % settings.checkpoint_every == 0
                # in one process a signal is seen at once; under torchrun at the next sync, where all agree on it
                if (checkpoint_due or state.step % SYNC_EVERY == 0 or state.batch == self.steps_per_epoch
                        or (self.world == 1 and stop.signum is not None)):
                    signum = self.sync(stop)
                    bar.set_postfix(loss=f"{self.last_loss:.3f}", refresh=False)
                    if signum is not None:
                        self.save()
                        raise TrainingInterrupted(signum, self.uri)
                    if checkpoint_due:
                        self.save()
        if self.pending:  # only if the loader gave fewer than steps_per_epoch batches
            self.sync(stop)
        train_seconds = time.monotonic() - started
        distributed.broadcast_buffers(self.task)  # the last step's statistics: process 0's everywhere
        metrics = self.validate(self.task.student, self.device)
        means = {name: total / self.steps_per_epoch for name, total in state.sums.items()}
        row = {"epoch": state.epoch + 1, "step": state.step, "lr": self.scheduler.get_last_lr()[0],
               **{f"train_{name}": mean for name, mean in means.items()},
               **{f"val_{name}": value for name, value in metrics.items()},
               "images_per_second": steps * settings.batch_size / train_seconds,
               "seconds": time.monotonic() - started, "training_seconds": train_seconds}
        state.rows.append(row)
        if distributed.is_main():
            split = ", ".join(f"{name} {mean:.4f}" for name, mean in means.items() if name != "loss")
            print(f"{self.desc} epoch {row['epoch']}/{settings.epochs}: loss {means['loss']:.4f} ({split}), "
                  f"lr {row['lr']:.4g}, {row['images_per_second']:.0f} img/s, {_describe(metrics)}",
                  file=sys.stderr, flush=True)
        state.epoch, state.batch, state.sums = state.epoch + 1, 0, {}
        self.save(with_metrics=True)


def fit(task: torch.nn.Module, train_set, settings: TrainSettings, checkpoint_dir: str,
        validate: Validate, desc: str = "train", collate_fn: Callable | None = None) -> list[dict]:
    """Train ``task`` and return its metrics rows (see the module docstring)."""
    run = _Run(task, train_set, settings, checkpoint_dir, validate, desc, collate_fn)
    run.start()
    with StopOnSignal() as stop:
        while run.state.epoch < settings.epochs:
            run.epoch(stop)
    if run.world > 1:
        # one write, so that the processes' lines cannot interleave
        sys.stderr.write(f"{desc}: rank {run.rank}/{run.world} final parameter digest "
                         f"{distributed.parameters_digest(task)}\n")
        sys.stderr.flush()
    return run.state.rows

"""The settings of the training loop, shared by every training stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd_lib.config import check


@dataclass
class TrainSettings:
    """Optimisation, checkpointing and device settings.

    Defaults follow Pixel Distillation's official CNN recipe (SGD, momentum
    0.9, weight decay 5e-4, batch 64, lr 0.01); the step schedule there is
    x0.1 at epochs 30/60/90 of 120 (``schedule: step, milestones: [30, 60,
    90]``). Our default is a cosine decay, which needs no milestones when the
    number of epochs changes. ``grad_clip_norm > 0`` clips the global
    gradient norm of each step (off by default).
    """

    epochs: int = 10
    """passes over the training split"""
    batch_size: int = 64
    """images per step, over all processes together"""
    lr: float = 0.01
    """the SGD learning rate at the start"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay"""
    schedule: Literal["cosine", "step"] = "cosine"
    """the learning-rate schedule: cosine decay to 0, or x gamma at each milestone"""
    milestones: list[int] = field(default_factory=list)
    """step schedule: the epochs at which the rate is multiplied by gamma"""
    gamma: float = 0.1
    """step schedule: the factor at each milestone"""
    warmup_steps: int = 0
    """steps of linear warm-up from lr / 1000 before the schedule (0: none)"""
    grad_clip_norm: float = 0.0
    """clip the global gradient norm of each step to this (0: off)"""
    seed: int = 0
    """the seed of the initial weights and of the data order"""
    device: str = "auto"
    """auto (the GPU if there is one), cpu, cuda[:N] or mps"""
    amp: bool = True
    """bfloat16 autocast on a CUDA GPU that supports it"""
    channels_last: bool = False
    """train in the channels-last memory format (faster convolutions on recent GPUs)"""
    num_workers: int = 1
    """DataLoader worker processes"""
    checkpoint_every: int = 200
    """steps between checkpoints (one is also written at each epoch's end)"""

    def validate(self) -> None:
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 2, "batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.schedule != "step" or bool(self.milestones), "milestones",
              "the step schedule needs milestones (epochs)")
        check(all(0 < m < self.epochs for m in self.milestones), "milestones",
              f"each milestone must be an epoch in 1..{self.epochs - 1}, got {self.milestones}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0 (0: none), got {self.warmup_steps}")
        check(self.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0 (0: off), got {self.grad_clip_norm}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
              f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")

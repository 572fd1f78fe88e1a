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
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip_norm: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 1
    checkpoint_every: int = 200

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
        check(self.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0 (0: off), got {self.grad_clip_norm}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
              f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")

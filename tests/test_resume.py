"""A training run stopped mid-epoch and run again resumes where it stopped and ends bit-identical to an
uninterrupted run: the weights, the terms' modules, the discriminators' optimizers and the metrics rows,
for a model with dropout as well."""

import math
import os
import signal

import pytest
import torch

from components import teacher
from kd_lib.config import from_dict
from kd_lib.data import shards
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform
from kd_lib.distill.distiller import Distiller
from kd_lib.distill.methods import DistillSettings, build_distiller
from kd_lib.engine.loop import TrainingInterrupted, fit
from kd_lib.eval.accuracy import classifier_validation
from kd_lib.models import build_classifier

SETTINGS = {"epochs": 2, "batch_size": 8, "hr_size": 32, "ratio": 4, "num_workers": 0, "lr": 0.05, "device": "cpu"}
STEPS = 2 * (72 // 8)  # two epochs of the prepared fixture's 72 training images
STOP = 13  # epoch 2, batch 4
TIMING = ("seconds", "training_seconds", "images_per_second")


def build_task(method: str) -> Distiller:
    torch.manual_seed(0)
    if method == "dropout":  # MobileNetV3's classifier has dropout (p = 0.2)
        return Distiller(build_classifier("mobilenet_v3_small", 3), "hr")
    source = None if method == "ce" else build_classifier("resnet18", 3)
    return build_distiller(DistillSettings(method=method, isrd_weight=1.0), build_classifier("resnet18", 3),
                           source, hr_size=32, student_input_size=8)


def stop_at(task: Distiller, step: int | None) -> list[int]:
    """Count the task's training steps (in a list's length); at ``step``, SIGTERM to this process, as a
    preempted pod gets."""
    steps = []

    def count(module, args):
        if module.training:
            steps.append(1)
            if len(steps) == step:
                os.kill(os.getpid(), signal.SIGTERM)

    task.student.register_forward_pre_hook(count)
    return steps


def train(data: str, checkpoint_dir, method: str, stop: int | None = None):
    """The task trained by ``fit``, its metrics rows, and the number of steps this call took."""
    task = build_task(method)
    steps = stop_at(task, stop)
    settings = from_dict(teacher.TeacherConfig, {**SETTINGS, "data": data, "out": "unused"})
    train_set, val_set = (ShardedImageDataset(data, split, CropTransform(32, 4, train=split == "train"))
                          for split in ("train", "val"))
    rows = fit(task, train_set, settings, str(checkpoint_dir), classifier_validation(val_set, task.student_view))
    return task, rows, len(steps)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def windowed(tmp_path, monkeypatch, make_imagefolder) -> str:
    """The prepared fixture's images with one image per row group: 72 blocks, so the sampler's windowed
    shuffle (more blocks than CACHED_GROUPS) orders the epochs."""
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 1)
    data = str(tmp_path / "windowed")
    shards.prepare_imagefolder(str(make_imagefolder(tmp_path / "src", train=24, val=6)), data)
    assert len(ShardedImageDataset(data, "train", CropTransform(32, 4, train=True)).blocks) == 72 > shards.CACHED_GROUPS
    return data


@pytest.mark.parametrize("method, data", [("ce", "prepared"), ("crkd+isrd", "prepared"), ("dropout", "prepared"),
                                          ("ce", "windowed")])
def test_a_stopped_run_resumes_bit_identical_to_an_uninterrupted_one(prepared, tmp_path, capfd, monkeypatch,
                                                                     make_imagefolder, method, data):
    prepared = prepared if data == "prepared" else windowed(tmp_path, monkeypatch, make_imagefolder)
    straight, straight_rows, straight_steps = train(prepared, tmp_path / "straight", method)
    assert straight_steps == STEPS

    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        train(prepared, tmp_path / "resumed", method, stop=STOP)
    saved = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert {k: saved["loop"][k] for k in ("epoch", "batch", "step")} == {"epoch": 1, "batch": 4, "step": STOP}
    capfd.readouterr()

    resumed, rows, steps = train(prepared, tmp_path / "resumed", method)
    assert f"train: resumed from {tmp_path / 'resumed' / 'last.pt'} at epoch 2, batch 4" in capfd.readouterr().err
    assert steps == STEPS - STOP  # it went on from the checkpoint, rather than starting over
    # student, terms' modules (ISRD decoder, CRKD discriminator) and the discriminators' optimizers;
    # nested keys and lengths must match too
    torch.testing.assert_close(resumed.trainable_state_dict(), straight.trainable_state_dict(), rtol=0, atol=0)
    assert without_timing(rows) == without_timing(straight_rows)
    assert [r["epoch"] for r in rows] == [1, 2]


def test_channels_last_trains_the_same_task_in_the_other_memory_format(prepared, tmp_path):
    """The weights and both batches in channels-last: the same first step up to float rounding."""
    train_set = ShardedImageDataset(prepared, "train", CropTransform(32, 4, train=True))

    def first_outputs(channels_last: bool) -> tuple[Distiller, list]:
        task, seen = build_task("kd+isrd"), []
        task.student.register_forward_hook(lambda module, args, out: seen.append(
            (args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous(),
             out.detach().clone())))
        settings = from_dict(teacher.TeacherConfig, {**SETTINGS, "epochs": 1, "data": prepared, "out": "unused",
                                                     "channels_last": channels_last})
        rows = fit(task, train_set, settings, str(tmp_path / str(channels_last)), lambda student, device: {})
        assert math.isfinite(rows[0]["train_loss"])
        return task, seen

    task, seen = first_outputs(True)
    assert task.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(seen) == 9 and all(layout for layout, _ in seen)  # every LR batch the student saw
    _, plain = first_outputs(False)
    assert not any(layout for layout, _ in plain)
    torch.testing.assert_close(seen[0][1], plain[0][1], atol=1e-4, rtol=1e-4)

"""What every training stage shares: its config fields, its run and its CLI.

A training stage reads prepared data (and upstream models) by URI, trains one
:class:`~kd_lib.distill.distiller.Distiller` with the shared loop, and
publishes under ``out``: ``model.pt``, ``metrics.parquet``, and
``manifest.json`` last. Its key hashes the stage, the settings that change
the result and the fingerprints of its inputs:

- ``out`` already holds a manifest with that key: nothing to do;
- a checkpoint exists under ``checkpoint_root/<stage>-<key>``: resume it;
- on success the checkpoint folder is removed; on failure nothing is
  published and earlier outputs stay as they were.

Under ``torchrun`` every process trains (data-parallel, see
:mod:`kd_lib.engine.distributed`) and only the main one writes; the CLI joins
the process group for the run and leaves it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kd_lib.config import ConfigError, add_arguments, check, from_args
from kd_lib.data.imagefolder import DataError
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform
from kd_lib.distill.distiller import Distiller, View
from kd_lib.engine import distributed
from kd_lib.engine.loop import NonFiniteLossError, TrainingInterrupted, fit, resolve_device, write_metrics
from kd_lib.engine.settings import TrainSettings
from kd_lib.eval.accuracy import classifier_validation
from kd_lib.io.fs import StorageError, join, remove, remove_if_empty
from kd_lib.io.manifest import IncompleteOutputError, finished_with_key, read_manifest, stage_key, unpublish, write_manifest
from kd_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kd_lib.models import check_architecture
from kd_lib.models.store import MODEL_FILE, load_classifier, save_classifier
from kd_lib.models.weights import (LoadReport, WeightsError, lr_scales, resolved_weights, start_classifier,
                                   started_from, weights_fingerprint)
from kd_lib.ops import ResizeMode

METRICS_FILE = "metrics.parquet"
#: Fields that say where things go or how fast they run, not what is computed.
NOT_IN_KEY = ("data", "out", "checkpoint_root", "device", "num_workers", "checkpoint_every")


@dataclass
class TrainStageConfig(TrainSettings):
    """Fields of every training stage (on top of the loop's settings).

    ``weights``: where the trained model starts from (:mod:`kd_lib.models.weights`: ``""`` random,
    ``torchvision:DEFAULT``, ``timm:TAG[,file=PATH]``, or the URI of a model folder, a state dict
    or a ``.safetensors`` file). The tensors taken from it train at ``weights_lr_scale x lr``
    and a re-initialised head at ``lr`` (the fine-tuning recipe, :func:`kd_lib.models.weights.lr_scales`).
    """

    data: str = ""
    out: str = ""
    arch: str = "resnet18"
    hr_size: int = 64
    ratio: int = 4
    resize: ResizeMode = "bilinear"
    crop_scale: float = 0.35
    checkpoint_root: str = ""
    weights: str = ""
    """where the model starts from: "" random, torchvision:DEFAULT, timm:TAG[,file=PATH], or a model folder,
    state dict or .safetensors URI"""
    weights_lr_scale: float = 0.1
    """the lr of the tensors taken from weights, as a fraction of lr (a new head trains at lr)"""

    def validate(self) -> None:
        super().validate()
        check(bool(self.data), "data", "is required: the prepare-data output URI")
        check(0 < self.weights_lr_scale <= 1, "weights_lr_scale", f"must be in (0, 1], got {self.weights_lr_scale}")
        check(bool(self.out), "out", "is required: where this stage writes its outputs")
        check(self.ratio >= 1, "ratio", f"must be >= 1, got {self.ratio}")
        check(self.hr_size >= 8, "hr_size", f"must be >= 8, got {self.hr_size}")
        check(self.hr_size % self.ratio == 0, "hr_size",
              f"{self.hr_size} is not divisible by ratio {self.ratio}: the LR side must be exact")
        check(0 < self.crop_scale <= 1, "crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        check_architecture(self.arch)

    @property
    def lr_size(self) -> int:
        return self.hr_size // self.ratio


def load_upstream(uri: str, field: str, classes: list[str]) -> tuple[torch.nn.Module, dict, str]:
    """An upstream model, its metadata and its fingerprint, checked against the data's classes."""
    manifest = read_manifest(uri)
    model, meta = load_classifier(uri)
    if meta["classes"] != classes:
        raise DataError(f"{field} at {uri} was trained on {len(meta['classes'])} classes, but the data "
                        f"has {len(classes)}: they must be the same classes in the same order")
    return model, meta, manifest["fingerprint"]


@dataclass
class StagePlan:
    """What a training stage trains: the task and the metadata of the model it publishes, with
    where its student started from (``started_from``, and the load's report when weights were loaded)."""

    task: Distiller
    arch: str
    view: View
    started_from: str = "random"
    weights_report: LoadReport | None = None


@dataclass
class StageRun:
    """One run of a stage: its key (stage, settings, input fingerprints) and its checkpoint folder."""

    stage: str
    key: str
    checkpoint_root: str
    checkpoint_dir: str
    owns_root: bool  # the root is the default one under ``out``, removed once empty

    @classmethod
    def of(cls, stage: str, config, inputs: dict[str, str]) -> StageRun:
        settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_KEY}
        key = stage_key(stage, settings, inputs)
        root = config.checkpoint_root or join(config.out, "checkpoints")
        return cls(stage, key, root, join(root, f"{stage}-{key[:16]}"), not config.checkpoint_root)

    def finished(self, out: str) -> dict | None:
        """The manifest under ``out`` if this very run already published there."""
        done = finished_with_key(out, self.key)
        if done is not None:
            print(f"{self.stage}: up to date at {out} (key {self.key[:12]})", file=sys.stderr)
        return done

    def publish(self, out: str, files: list[str], info: dict) -> dict:
        """Write the manifest over the files already written under ``out``, then drop the checkpoints."""
        manifest = write_manifest(out, stage=self.stage, key=self.key, files=files, info=info)
        remove(self.checkpoint_dir, recursive=True)
        if self.owns_root:
            remove_if_empty(self.checkpoint_root)
        return manifest


def publish_on_main(out: str, write: Callable[[], dict]) -> dict:
    """Call ``write``, which writes the outputs under ``out`` and returns their manifest, on the main
    process only; under ``torchrun`` the others wait for it and return the manifest it wrote."""
    manifest = write() if distributed.is_main() else None
    distributed.barrier()
    return manifest if manifest is not None else read_manifest(out)


def run_training_stage(stage: str, config: TrainStageConfig, upstream: dict[str, str],
                       plan: Callable[[list[str], dict[str, tuple]], StagePlan]) -> dict[str, Any]:
    """Run one training stage end to end (see the module docstring).

    ``upstream`` maps config field names to URIs of finished stage outputs;
    ``plan(classes, models)`` builds the task from the data's class names and
    the loaded upstream ``(model, meta)`` pairs.
    """
    data_manifest = read_manifest(config.data)
    classes = data_manifest["classes"]
    loaded = {name: load_upstream(uri, name, classes) for name, uri in upstream.items()}
    inputs = {"data": data_manifest["data_fingerprint"], **{n: fp for n, (_, _, fp) in loaded.items()}}
    if config.weights:
        inputs["weights"] = weights_fingerprint(config.weights)
    run = StageRun.of(stage, config, inputs)
    done = run.finished(config.out)
    if done is not None:
        return done
    torch.manual_seed(config.seed)
    planned = plan(classes, {name: (model, meta) for name, (model, meta, _) in loaded.items()})
    planned.task.lr_scales = lr_scales(planned.task.student, planned.weights_report, config.weights_lr_scale)
    train_set, val_set = (ShardedImageDataset(config.data, split, CropTransform(
        config.hr_size, config.ratio, train=split == "train", resize=config.resize,
        crop_scale=config.crop_scale)) for split in ("train", "val"))
    rows = fit(planned.task, train_set, config, run.checkpoint_dir,
               classifier_validation(val_set, planned.view, config.num_workers), desc=stage)

    def write() -> dict:
        unpublish(config.out)
        input_size = config.hr_size if planned.view == "hr" else config.lr_size
        save_classifier(config.out, planned.task.student.cpu(), arch=planned.arch, classes=classes,
                        input_size=input_size, stage=stage, hr_size=config.hr_size, ratio=config.ratio,
                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), resize=config.resize,
                        started_from=planned.started_from)
        write_metrics(rows, join(config.out, METRICS_FILE))
        return run.publish(config.out, [MODEL_FILE, METRICS_FILE],
                           {"config": asdict(config), "inputs": {"data": config.data, **upstream},
                            "final": rows[-1], "started_from": planned.started_from,
                            **({"weights": planned.weights_report.as_dict()} if planned.weights_report else {})})

    return publish_on_main(config.out, write)


def started(arch: str, weights: str, report: LoadReport | None) -> tuple[str, LoadReport | None]:
    """A :class:`StagePlan`'s ``started_from`` and ``weights_report`` for a model started from ``weights``."""
    if report is not None:
        print(f"weights {report.summary()}", file=sys.stderr)
    return started_from(resolved_weights(arch, weights)), report


def run_supervised(stage: str, config: TrainStageConfig, view: View) -> dict[str, Any]:
    """A stage that trains ``config.arch`` from ``config.weights`` with cross-entropy alone on one view."""
    def plan(classes, models):
        model, report = start_classifier(config.arch, len(classes), config.weights)
        return StagePlan(Distiller(model, view), config.arch, view, *started(config.arch, config.weights, report))

    return run_training_stage(stage, config, {}, plan)


#: Errors a user can fix: printed as one line, exit status 1.
USER_ERRORS = (ConfigError, DataError, WeightsError, IncompleteOutputError, StorageError, NonFiniteLossError,
               FileNotFoundError)


def _process_group(config) -> contextlib.AbstractContextManager:
    """Torchrun's process group for the run of a training stage (nothing to join for other stages)."""
    if isinstance(config, TrainSettings):
        return distributed.process_group(resolve_device(config.device))
    return contextlib.nullcontext()


def stage_cli(config_cls: type, run: Callable[[Any], Any], argv: list[str] | None, prog: str,
              description: str) -> int:
    """Parse ``--config``/flags into ``config_cls``, call ``run`` and map errors to exit codes."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = from_args(config_cls, args)
        with _process_group(config):
            run(config)
    except TrainingInterrupted as err:
        print(f"{prog}: {err}; run the same command again to resume", file=sys.stderr)
        return 128 + err.signum
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0

"""What every stage shares: its output's safety checks, the training lifecycle and the CLI.

Every stage first runs :func:`preflight` (before any data is read): ``out``
must be a folder that neither is, lies inside nor holds one of the stage's
inputs, holds no other stage's output (``force`` overrides the latter), it
must be writable (a probe file is written and removed), every input must
answer within ``storage_timeout`` seconds, ``out`` may not be ``memory://`` (it
would vanish with the process), and the device must exist. Then
it takes the lease on ``out`` (:mod:`kd_lib.io.lease`: one writer per
output), held until the stage's run ends (:func:`stage_run`: ``kdp stage``, a
KFP task).

A training stage reads prepared data (and upstream models) by URI, trains
with the shared loop and publishes under ``out`` ``model.pt``,
``metrics.parquet`` and ``manifest.json`` last, through
:class:`~kd_lib.io.publish.Publication`: the previous output stays published
until the new one is whole. Its lifecycle, one for classification and
detection (:func:`run_lifecycle`): the key hashes the stage, the settings
that change the result and the fingerprints of its inputs;

- ``out`` already holds a manifest with that key: nothing to do;
- a checkpoint exists under ``checkpoint_root/<stage>-<key>``: resume it (the
  previous one if the last is damaged; none readable: an error, and
  ``restart`` starts over);
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
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kd_lib.config import ConfigError, add_arguments, check, from_args
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CropTransform
from kd_lib.distill.distiller import Distiller, View
from kd_lib.engine import distributed
from kd_lib.engine.loop import fit, resolve_device, write_metrics
from kd_lib.engine.settings import TrainSettings
from kd_lib.errors import DataError, guarded, take_debug_flag
from kd_lib.eval.accuracy import classifier_validation
from kd_lib.io.checkpoint import discard_damaged
from kd_lib.io.lease import Lease
from kd_lib.io.fs import (STORAGE_TIMEOUT, check_reachable, check_writable, connect, filesystem, is_file, join,
                          remove, remove_if_empty, within)
from kd_lib.io.manifest import MANIFEST, IncompleteOutputError, finished_with_key, read_manifest, stage_key
from kd_lib.io.publish import Publication, previous_manifest
from kd_lib.models import check_architecture
from kd_lib.models.store import MODEL_FILE, load_classifier, save_classifier
from kd_lib.models.weights import (LoadReport, lr_scales, resolved_weights, start_classifier,
                                   started_from, weights_fingerprint)
from kd_lib.ops import ResizeMode

METRICS_FILE = "metrics.parquet"
#: Fields that say where things go, how fast they run or how they start, not what is computed.
NOT_IN_KEY = ("data", "out", "checkpoint_root", "device", "num_workers", "checkpoint_every", "force",
              "storage_timeout", "restart")
#: The smallest LR side: below it a CNN's pooled features are 1x1 before its last stage.
MIN_LR_SIDE = 8


@dataclass
class OutputSettings:
    """Fields of every stage about its output (each field's docstring says what it does)."""

    force: bool = False
    """write into an out that holds another stage's output (its files stay, its manifest is replaced)"""
    storage_timeout: float = STORAGE_TIMEOUT
    """seconds the first contact with each location may take before it counts as unreachable"""

    def validate_output(self) -> None:
        check(self.storage_timeout > 0, "storage_timeout", f"must be > 0 seconds, got {self.storage_timeout}")


@dataclass
class TrainingOutputSettings(OutputSettings):
    """:class:`OutputSettings` plus ``restart``, for stages that train."""

    restart: bool = False
    """start the training over when no checkpoint is readable"""


@dataclass
class TrainStageConfig(TrainSettings, TrainingOutputSettings):
    """Fields of every classification training stage (on top of the loop's settings).

    ``weights``: where the trained model starts from (:mod:`kd_lib.models.weights`: ``""`` random,
    ``torchvision:DEFAULT``, ``timm:TAG[,file=PATH]``, or the URI of a model folder, a state dict
    or a ``.safetensors`` file). The tensors taken from it train at ``weights_lr_scale x lr``
    and a re-initialised head at ``lr`` (the fine-tuning recipe, :func:`kd_lib.models.weights.lr_scales`).
    """

    data: str = ""
    """the prepare-data output URI"""
    out: str = ""
    """where this stage writes its outputs"""
    arch: str = "resnet18"
    """the architecture: a torchvision model name or timm:NAME,key=value,..."""
    hr_size: int = 64
    """the side of the HR training crop, in px"""
    ratio: int = 4
    """the LR image is the HR one downsampled by this factor"""
    resize: ResizeMode = "bilinear"
    """how the LR image is made from the HR one"""
    crop_scale: float = 0.35
    """the smallest share of the image a random training crop covers"""
    checkpoint_root: str = ""
    """where checkpoints go ('': a checkpoints/ folder under out)"""
    weights: str = ""
    """where the model starts from: "" random, torchvision:DEFAULT, timm:TAG[,file=PATH], or a model folder,
    state dict or .safetensors URI"""
    weights_lr_scale: float = 0.1
    """the lr of the tensors taken from weights, as a fraction of lr (a new head trains at lr)"""

    def validate(self) -> None:
        super().validate()
        self.validate_output()
        check(bool(self.data), "data", "is required: the prepare-data output URI")
        check(0 < self.weights_lr_scale <= 1, "weights_lr_scale", f"must be in (0, 1], got {self.weights_lr_scale}")
        check(bool(self.out), "out", "is required: where this stage writes its outputs")
        check(self.ratio >= 1, "ratio", f"must be >= 1, got {self.ratio}")
        check(self.hr_size >= 8, "hr_size", f"must be >= 8, got {self.hr_size}")
        check(self.hr_size % self.ratio == 0, "hr_size",
              f"{self.hr_size} is not divisible by ratio {self.ratio}: the LR side must be exact")
        check(self.lr_size >= MIN_LR_SIDE, "ratio", f"hr_size {self.hr_size} / ratio {self.ratio} gives an LR side "
              f"of {self.lr_size} px; it must be at least {MIN_LR_SIDE} px: lower ratio or raise hr_size")
        check(0 < self.crop_scale <= 1, "crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        check_architecture(self.arch)

    @property
    def lr_size(self) -> int:
        return self.hr_size // self.ratio


def check_device(name: str) -> None:
    """:class:`ConfigError` naming ``device`` unless the device exists on this machine."""
    kind, _, index = name.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count()
        check(count > 0, "device", f"{name!r}: this machine has no CUDA device; use --device cpu or auto")
        check(not index or int(index) < count, "device", f"{name!r}: this machine has {count} CUDA device(s)")
    if kind == "mps":
        check(torch.backends.mps.is_available(), "device", f"{name!r}: MPS is not available here; use cpu or auto")


#: Where :func:`preflight` keeps the lease it takes: the :func:`stage_run` around it (a stage's ``run``
#: called from Python, outside one, takes none).
_leases: ContextVar[contextlib.ExitStack | None] = ContextVar("leases", default=None)


@contextlib.contextmanager
def stage_run() -> Iterator[None]:
    """One run of a stage (``kdp stage``, a KFP task): the lease its preflight takes on ``out`` is given
    back when the block ends."""
    with contextlib.ExitStack() as leases:
        token = _leases.set(leases)
        try:
            yield
        finally:
            _leases.reset(token)


def preflight(stage: str, config, inputs: dict[str, str]) -> None:
    """The checks before any work (module docstring); ``inputs`` maps config fields to input URIs."""
    out, timeout = config.out, config.storage_timeout
    for uri in (out, *inputs.values()):
        connect(uri, timeout)  # the first contact with each store, its credentials looked up, bounded too
    for field, uri in inputs.items():
        inside, holds = within(out, uri), within(uri, out)
        if inside or holds:
            relation = "is" if inside and holds else "lies inside" if inside else "holds"
            raise ConfigError("out", f"{out} {relation} the {field} input {uri}: a stage never writes into what "
                              "it reads; choose another out")
    if filesystem(out)[0].protocol == "memory":
        raise ConfigError("out", f"{out} lives in this process's memory and vanishes when the stage ends; "
                          "choose a path or a bucket URI")
    for field, uri in inputs.items():
        if not check_reachable(uri, timeout):
            raise IncompleteOutputError(f"{field}: {uri} does not exist")
    if check_reachable(out, timeout):
        if is_file(out):
            raise ConfigError("out", f"{out} is a file; out must be a folder")
        other = previous_manifest(out)
        if other is not None and other["stage"] != stage and not config.force:
            raise ConfigError("out", f"{out} holds the output of stage {other['stage']!r} ({MANIFEST}); a "
                              f"{stage} stage never writes over another stage's output: choose another out, or "
                              "pass --force to replace its manifest (its files stay)")
    if distributed.is_main():  # the one process that writes (a probe from each would race on the folder)
        check_writable(out, timeout)
        if getattr(config, "checkpoint_root", ""):  # a training stage's, where a full epoch's work goes
            check_writable(config.checkpoint_root, timeout, "checkpoint_root")
        leases = _leases.get()
        if leases is not None:
            leases.enter_context(Lease(out))
    if isinstance(config, TrainSettings) and config.device != "auto":
        check_device(config.device)


def data_manifest(uri: str, task: str) -> dict[str, Any]:
    """The manifest of the prepared ``task`` data at ``uri``, checked to be that and usable."""
    manifest = read_manifest(uri)
    if manifest["stage"] != "prepare-data":
        raise DataError(f"data: {uri} holds the output of stage {manifest['stage']!r}, not prepared data: "
                        "give the out of prepare-data")
    found = manifest.get("task", "classification")
    if found != task:
        raise DataError(f"data: {uri} holds {found} data; this stage needs {task} data (prepare "
                        f"{'an ImageFolder' if task == 'classification' else 'a COCO or YOLO dataset'})")
    if task == "classification" and len(manifest["classes"]) < 2:
        raise DataError(f"data: {uri} has {len(manifest['classes'])} class ({', '.join(manifest['classes'])}); "
                        "a classifier needs at least 2")
    return manifest


def warn_small_images(uri: str, manifest: dict, side: int) -> None:
    """Warn when images of the prepared data at ``uri`` are far smaller (a shorter side under half)
    than the ``side`` they are trained at: they are upsampled more than 2x."""
    counts = manifest.get("short_sides", {})
    small = sum(count for bucket, count in counts.items() if 2 * int(bucket) <= side // 2)
    if small:
        total = sum(counts.values())
        logging.getLogger("kdp").warning("%s: %d of %d images have a shorter side under %d px, far smaller than "
                                         "hr_size %d: they are upsampled more than 2x", uri, small, total,
                                         side // 2, side)


def check_max_side(uri: str, manifest: dict, hr_size: int) -> None:
    """:class:`ConfigError` on ``hr_size`` when the prepared data at ``uri`` were stored with their shorter sides
    bounded (prepare-data's ``max_side``, FFCV's bounded resolution) under it: every validation crop, and every
    training crop, would be upsampled from fewer pixels than the model is given."""
    max_side = manifest.get("max_side", 0)
    if max_side and hr_size > max_side:
        raise ConfigError("hr_size", f"{hr_size} is larger than the images of data {uri} allow: prepare-data "
                                     f"stored them with max_side {max_side} (shorter sides of at most {max_side} "
                                     f"px); give hr_size <= {max_side}, or prepare the data again with a "
                                     f"max_side of at least {hr_size}")


def check_same_classes(field: str, uri: str, trained_on: list[str], data: list[str], why: str) -> None:
    """:class:`DataError` naming the model ``field`` at ``uri`` and both class lists (shortened) unless the
    model was ``trained_on`` the ``data``'s classes, in the same order; ``why`` says what needs that."""
    if trained_on != data:
        def listed(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")

        raise DataError(f"{field} at {uri} was trained on classes [{listed(trained_on)}], the data has "
                        f"[{listed(data)}]: {why}")


def load_upstream(uri: str, field: str, classes: list[str]) -> tuple[torch.nn.Module, dict, str]:
    """An upstream model, its metadata and its fingerprint, checked against the data's classes."""
    manifest = read_manifest(uri)
    model, meta = load_classifier(uri)
    check_same_classes(field, uri, meta["classes"], classes, "they must be the same classes in the same order")
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


def run_key(stage: str, config, inputs: dict[str, str], ignored: tuple[str, ...] = ()) -> str:
    """The key of a run of ``stage``: the fields of ``config`` that change its result (all but
    :data:`NOT_IN_KEY` and ``ignored``) and ``inputs``, the fingerprints of what it reads."""
    ignored = NOT_IN_KEY + ignored
    return stage_key(stage, {k: v for k, v in asdict(config).items() if k not in ignored}, inputs)


def finished(stage: str, out: str, key: str) -> dict | None:
    """The manifest under ``out`` if a run of ``stage`` with ``key`` already published there (and says so)."""
    done = finished_with_key(out, key)
    if done is not None:
        print(f"{stage}: up to date at {out} (key {key[:12]})", file=sys.stderr)
    return done


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
        key = run_key(stage, config, inputs)
        root = config.checkpoint_root or join(config.out, "checkpoints")
        return cls(stage, key, root, join(root, f"{stage}-{key[:16]}"), not config.checkpoint_root)

    def finished(self, out: str) -> dict | None:
        """The manifest under ``out`` if this very run already published there."""
        return finished(self.stage, out, self.key)

    def publish(self, out: str, write: Write) -> dict:
        """Publish what ``write`` writes under ``out`` (:class:`~kd_lib.io.publish.Publication`), then
        drop the checkpoints."""
        with Publication(out, self.stage, self.key) as publication:
            files, info = write(publication)
            manifest = publication.commit(files, info)
        remove(self.checkpoint_dir, recursive=True)
        if self.owns_root:
            remove_if_empty(self.checkpoint_root)
        return manifest


#: ``write(publication) -> (files, info)``: writes the files of an output under ``publication.folder``
#: (and its children's), returns their names and the manifest's other fields.
Write = Callable[[Publication], tuple[list[str], dict]]


def publish_on_main(out: str, write: Callable[[], dict]) -> dict:
    """Call ``write``, which writes the outputs under ``out`` and returns their manifest, on the main
    process only; under ``torchrun`` the others wait for it and return the manifest it wrote."""
    manifest = write() if distributed.is_main() else None
    distributed.barrier()
    return manifest if manifest is not None else read_manifest(out)


def run_lifecycle(stage: str, config, fingerprints: dict[str, str], train: Callable[[StageRun], Write],
                  key_config=None) -> dict[str, Any]:
    """The lifecycle of every training stage (module docstring): key, finished check, seed, train, publish.

    ``fingerprints``: the identities of the inputs; ``train(run)`` trains (checkpointing under
    ``run.checkpoint_dir``) and returns the :data:`Write` of its output; ``key_config``: the config
    that keys the run, when fields of ``config`` do not change the result.
    """
    run = StageRun.of(stage, key_config or config, fingerprints)
    done = run.finished(config.out)
    if done is not None:
        return done
    if config.restart and distributed.is_main():
        discard_damaged(run.checkpoint_dir)
    distributed.barrier()
    torch.manual_seed(config.seed)
    write = train(run)
    return publish_on_main(config.out, lambda: run.publish(config.out, write))


def run_training_stage(stage: str, config: TrainStageConfig, upstream: dict[str, str],
                       plan: Callable[[list[str], dict[str, tuple]], StagePlan]) -> dict[str, Any]:
    """Run one classification training stage end to end (see the module docstring).

    ``upstream`` maps config field names to URIs of finished stage outputs;
    ``plan(classes, models)`` builds the task from the data's class names and
    the loaded upstream ``(model, meta)`` pairs.
    """
    preflight(stage, config, {"data": config.data, **upstream})
    data = data_manifest(config.data, "classification")
    classes = data["classes"]
    check_max_side(config.data, data, config.hr_size)
    warn_small_images(config.data, data, config.hr_size)
    loaded = {name: load_upstream(uri, name, classes) for name, uri in upstream.items()}

    def train(run: StageRun) -> Write:
        planned = plan(classes, {name: (model, meta) for name, (model, meta, _) in loaded.items()})
        planned.task.lr_scales = lr_scales(planned.task.student, planned.weights_report, config.weights_lr_scale)
        train_set, val_set = (ShardedImageDataset(config.data, split, CropTransform(
            config.hr_size, config.ratio, train=split == "train", resize=config.resize,
            crop_scale=config.crop_scale)) for split in ("train", "val"))
        rows = fit(planned.task, train_set, config, run.checkpoint_dir,
                   classifier_validation(val_set, planned.view, config.num_workers), desc=stage)

        def write(publication: Publication) -> tuple[list[str], dict]:
            input_size = config.hr_size if planned.view == "hr" else config.lr_size
            save_classifier(publication.folder, planned.task.student.cpu(), arch=planned.arch, classes=classes,
                            input_size=input_size, stage=stage, hr_size=config.hr_size, ratio=config.ratio,
                            mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), resize=config.resize,
                            started_from=planned.started_from)
            write_metrics(rows, join(publication.folder, METRICS_FILE))
            report = {"weights": planned.weights_report.as_dict()} if planned.weights_report else {}
            return [MODEL_FILE, METRICS_FILE], {"config": asdict(config),
                                                "inputs": {"data": config.data, **upstream}, "final": rows[-1],
                                                "started_from": planned.started_from, **report}

        return write

    fingerprints = {"data": data["data_fingerprint"], **{n: fp for n, (_, _, fp) in loaded.items()}}
    if config.weights:
        fingerprints["weights"] = weights_fingerprint(config.weights)
    return run_lifecycle(stage, config, fingerprints, train)


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


def _process_group(config) -> contextlib.AbstractContextManager:
    """Torchrun's process group for the run of a training stage (nothing to join for other stages)."""
    if isinstance(config, TrainSettings):
        return distributed.process_group(resolve_device(config.device))
    return contextlib.nullcontext()


def stage_cli(config_cls: type, run: Callable[[Any], Any], argv: list[str] | None, prog: str,
              description: str) -> int:
    """Parse ``--config``/flags into ``config_cls``, call ``run`` and map errors to exit codes
    (:mod:`kd_lib.errors`: 2 for config and usage errors, 1 for other failures, 128 + N on signal N)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (or set KDP_DEBUG=1)")
    add_arguments(parser, config_cls)
    argv, debug = take_debug_flag(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        config = from_args(config_cls, args)
        with _process_group(config), stage_run():
            run(config)
        return 0

    return guarded(prog, body, debug)

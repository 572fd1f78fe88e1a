"""Does the data path scale? Training memory, loader and prepare-data throughput, data-parallel steps.

On generated ImageFolders of small images (``--side`` px PNGs of smooth
noise over 10 classes), measures:

- ``rss_mib``: the peak RSS of one training process (a subprocess that opens
  the training split of a prepared dataset and trains a ResNet-18 at
  ``--side`` px on it for ``TRAIN_STEPS`` steps with :func:`kd_lib.engine.loop.fit`),
  keyed by the dataset's image count. Target: less than ``RSS_GROWTH`` growth
  from the smallest set to the largest.
- ``loader_img_per_s``: training items per second out of a ``DataLoader`` with
  ``--workers`` workers, over the same images of the smallest set:
  ``project``, the prepared shards with their random crop, in the batches of
  the training sampler (:class:`~kd_lib.data.sampler.EpochBatchSampler`),
  and the HR/LR pair made on ``--device`` by the main process
  (:class:`~kd_lib.data.transforms.PairedResize`, as the loop does: one
  kernel on CUDA); ``project_unverified``, the same without checking each
  page read against its CRC-32 (what the integrity check costs: target
  under ``CHECK_COST``); ``official_style``, torchvision ``ImageFolder`` with
  ``RandomResizedCrop``, ``ToTensor`` and ``Normalize``, the HR and LR
  tensors both made in the workers and moved to ``--device``. Target:
  project / official style >= ``LOADER_RATIO``. Meanwhile this process runs
  ``--main-threads`` intra-op threads, by default the cores the loader
  workers leave (at least 1), as on any CPU where workers and compute share
  cores: its OpenMP threads otherwise spin between the batches on the cores
  the workers decode on.
- ``prepare_img_per_s``: prepare-data's images per second on the smallest set,
  keyed by its ``num_workers``, 1 and 2. Target: 2 workers >= ``PREPARE_RATIO``
  x 1 worker.
- ``loader_img_per_s_photos`` and ``prepare_img_per_s_photos``: the same on
  ``--photos`` JPEGs of ``--photo-side`` px with per-pixel grain, which cost
  about what ImageNet's photos cost to store and decode, the loader at
  ``--photo-hr`` px HR (224: ImageNet's protocol). The project's loader decodes
  each JPEG at the smallest DCT scale its crop allows
  (:meth:`~kd_lib.data.transforms.CropTransform.draft`); its target is
  ``PHOTO_LOADER_RATIO`` x the official style, prepare-data's the same as above.
  With ``--max-side N ...``, ``project_max_side_N``: the project's loader on the
  photos prepared with ``max_side=N`` (bounded resolution), whose shards' size
  ``shard_mib_photos`` gives beside the photos' own (``original``). With
  ``--loader-baseline C``, ``project@C``: the project's loader on the same
  shards, run on the library of a ``git worktree`` of ``C`` (a child process,
  in turn with the others).
- Each loader and prepare-data rate is the median of ``--repeats`` runs.
- ``ddp_steps_per_s``: ``fit`` steps per second under ``torchrun`` with 2 gloo
  processes (the same training as for ``rss_mib``, batch 32 split in two):
  ``ddp``, this checkout; with ``--baseline-commit C`` also ``hand_rolled``,
  the same script run on the library of a ``git worktree`` of ``C``.

Writes ``bench/results/data_scale.json`` and ``.md`` and prints the table;
exits 1 when a target is missed::

    python bench/data_scale.py --baseline-commit 46d99f8    # 20 k and 200 k images
    python bench/data_scale.py --baseline-commit 46d99f8 --loader-baseline 60a42dd --max-side 224 256
    python bench/data_scale.py --sizes 1000 10000 --batches 5 --photos 500  # a quick look
    python bench/data_scale.py --device cuda --sizes 20000  # the loaders into a GPU: data_scale-cuda.*
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(os.environ.get("DATA_SCALE_LIBRARY", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402

from kd_lib.data.sampler import EpochBatchSampler  # noqa: E402
from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder  # noqa: E402
from kd_lib.data.transforms import CropTransform  # noqa: E402
from kd_lib.io.manifest import read_manifest  # noqa: E402
from official_style import CLASSES, PairedFolder, write_images  # noqa: E402

HERE = Path(__file__).resolve()
RATIO, BATCH, TRAIN_STEPS = 4, 32, 20
RSS_GROWTH, LOADER_RATIO, PREPARE_RATIO, CHECK_COST = 0.15, 1.5, 1.6, 0.05
#: The photo loader's target against the official style's.
PHOTO_LOADER_RATIO = 2.5
#: The photos' per-pixel noise: about 36 KB a 384 px JPEG (quality 75), 1 ms to decode here.
PHOTO_GRAIN = 18.0


def train_steps(data: str, side: int) -> float:
    """Train a ResNet-18 for ``TRAIN_STEPS`` steps on ``data``'s training split; returns steps per second.

    The training set is the whole split (what a stage opens) with a ``TRAIN_STEPS``-batch view of it trained
    on; under ``torchrun`` each process takes its share of every batch."""
    from kd_lib.distill.methods import DistillSettings, build_distiller
    from kd_lib.engine.loop import fit
    from kd_lib.engine.settings import TrainSettings

    trained = FirstItems(ShardedImageDataset(data, "train", CropTransform(side, RATIO, train=True)),
                         BATCH * TRAIN_STEPS)
    torch.manual_seed(0)
    task = build_distiller(DistillSettings(method="ce"), torchvision.models.resnet18(num_classes=CLASSES), None,
                           hr_size=side, student_input_size=side)
    settings = TrainSettings(epochs=1, batch_size=BATCH, device="cpu", num_workers=0, amp=False)
    with tempfile.TemporaryDirectory() as checkpoints:
        started = time.perf_counter()
        fit(task, trained, settings, checkpoints, lambda student, device: {}, desc="data_scale")
        return TRAIN_STEPS / (time.perf_counter() - started)


class FirstItems(torch.utils.data.Dataset):
    """The first ``count`` items of a training set, which stays whole (and as large) behind them."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count, self.pairing = dataset, count, dataset.pairing

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):
        return self.dataset[item]


def child_output(command: list[str], what: str, env: dict | None = None) -> str:
    """Run ``command``; its standard output, or exit naming ``what`` with the end of its standard error."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def child(kind: str, data: str, side: int, extra_env: dict | None = None, extra_args: tuple[str, ...] = ()) -> dict:
    """Run this script's ``--child KIND`` in a subprocess (under ``torchrun`` for ``ddp``); its JSON line."""
    command = [sys.executable, str(HERE), "--child", kind, "--data", data, "--side", str(side), *extra_args]
    if kind == "ddp":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *command[1:]]
    output = child_output(command, f"bench/data_scale.py: the {kind} child", {**os.environ, **(extra_env or {})})
    return json.loads(output.strip().splitlines()[-1])


def loader_rates(source: Path, data: str, hr_size: int, workers: int, batches: int, device: torch.device,
                 main_threads: int, bounded: dict[str, str] | None = None, libraries: dict[str, Path] | None = None
                 ) -> dict[str, float]:
    """Items per second out of each variant's loader, its batches on ``device`` (the project's HR/LR pair made
    there): the items of up to ``batches`` batches of 64 (fewer when the split is smaller) after a first one,
    this process running ``main_threads`` intra-op threads meanwhile. ``bounded`` names more prepared copies
    of the images for the project's loader, ``libraries`` other checkouts whose project loader a child process
    times on ``data``."""
    from kd_lib.eval.cost import torch_threads  # not at the top: a --baseline-commit child's library may lack it
    official = PairedFolder(str(source / "train"), hr_size, RATIO)
    order = torch.randperm(len(official), generator=torch.Generator().manual_seed(0)).tolist()[:64 * (batches + 1)]
    with torch_threads(main_threads):
        rates = {"project": project_rate(data, hr_size, workers, batches, device),
                 "project_unverified": project_rate(data, hr_size, workers, batches, device, verify=False),
                 "official_style": timed_rate(torch.utils.data.DataLoader(official, batch_size=64, sampler=order,
                                                                          num_workers=workers,
                                                                          pin_memory=device.type == "cuda"),
                                              lambda batch: [t.to(device, non_blocking=True) for t in batch[:2]],
                                              device),
                 **{name: project_rate(copy, hr_size, workers, batches, device)
                    for name, copy in (bounded or {}).items()}}
    arguments = ("--workers", str(workers), "--batches", str(batches), "--main-threads", str(main_threads),
                 "--device", str(device))
    for name, library in (libraries or {}).items():
        rates[name] = child("loader", data, hr_size, {"DATA_SCALE_LIBRARY": str(library)}, arguments)["img_per_s"]
    return rates


def project_rate(data: str, hr_size: int, workers: int, batches: int, device: torch.device,
                 verify: bool = True) -> float:
    """Items per second out of the project's loader on ``data``'s training split, in the batches of the training
    sampler, the HR/LR pair made on ``device``; ``verify=False`` reads the pages without checking their CRC-32
    (what the integrity check costs)."""
    dataset = ShardedImageDataset(data, "train", CropTransform(hr_size, RATIO, train=True))
    dataset.verify_pages = verify
    sampled = list(EpochBatchSampler(len(dataset), 64, seed=0, epoch=0, blocks=dataset.blocks))[:batches + 1]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampled, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    return timed_rate(loader, lambda batch: dataset.pairing(batch[0].to(device, non_blocking=True)), device)


def shard_mib(data: str) -> float:
    """The size of a prepared dataset's shards, from its manifest, in MiB."""
    return sum(read_manifest(data)["sizes"].values()) / 2 ** 20


def median_rate(measure: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    """The median of ``repeats`` calls of ``measure`` (a rate per variant or worker count), per key."""
    runs = [measure() for _ in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def timed_rate(loader, pair, device: torch.device) -> float:
    """Items per second through ``pair(batch)`` for each batch of ``loader``, timed from the end of the first
    batch (the workers' start-up excluded), counting the items of the batches after it."""
    started, items = None, 0
    for batch in loader:
        pair(batch)
        if started is None:
            synchronize(device)
            started = time.perf_counter()
        else:
            items += len(batch[0])
    synchronize(device)
    return items / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_rates(source: Path, work: Path, images: int) -> dict[str, float]:
    """prepare-data's images per second on ``source`` (of ``images`` images), keyed by its ``num_workers``,
    1 and 2."""
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(dir=work) as out:
            rates[str(workers)] = images / timed(lambda: prepare_imagefolder(str(source), out, num_workers=workers))
    return rates


def count_images(source: Path) -> int:
    """The images of both splits of the ImageFolder ``source``."""
    return sum(1 for _ in source.glob("*/*/*.*"))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def baseline_library(commit: str, work: Path) -> Path:
    """A ``git worktree`` of ``commit`` under ``work`` (made once)."""
    tree = work / f"baseline-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(HERE.parents[1]), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
    return tree


def misses(result: dict) -> list[str]:
    found = []
    rss = list(result["rss_mib"].values())
    if rss[-1] > rss[0] * (1 + RSS_GROWTH):
        sizes = result["setup"]["sizes"]
        found.append(f"peak RSS grows {100 * (rss[-1] / rss[0] - 1):.0f} % from {sizes[0]} to {sizes[-1]} images "
                     f"(target: under {100 * RSS_GROWTH:.0f} %)")
    for images, suffix, target in (("small images", "", LOADER_RATIO), ("photos", "_photos", PHOTO_LOADER_RATIO)):
        loader = result.get("loader_img_per_s" + suffix)
        if loader and loader["project"] < (1 - CHECK_COST) * loader["project_unverified"]:
            found.append(f"on {images}, checking the shards' pages costs "
                         f"{100 * (1 - loader['project'] / loader['project_unverified']):.1f} % of the loader's rate "
                         f"(target: under {100 * CHECK_COST:.0f} %)")
        if loader and loader["project"] < target * loader["official_style"]:
            found.append(f"on {images}, the project's loader is {loader['project'] / loader['official_style']:.2f}x "
                         f"the official style's (target: {target}x)")
        prepare = result.get("prepare_img_per_s" + suffix)
        if prepare and prepare["2"] < PREPARE_RATIO * prepare["1"]:
            found.append(f"on {images}, prepare-data with 2 workers is {prepare['2'] / prepare['1']:.2f}x 1 worker "
                         f"(target: {PREPARE_RATIO}x)")
    return found


def figure(value: float) -> str:
    """``value`` as the table shows it: whole from 100 up, 3 significant digits below."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown(result: dict) -> str:
    lines = ["| measure | key | value |", "|---|---|---:|"]
    for measure in ("rss_mib", "loader_img_per_s", "prepare_img_per_s", "loader_img_per_s_photos",
                    "prepare_img_per_s_photos", "shard_mib_photos", "ddp_steps_per_s"):
        lines += [f"| {measure} | {key} | {figure(value)} |" for key, value in result.get(measure, {}).items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000], help="image counts")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of both loader variants")
    parser.add_argument("--batches", type=int, default=120, help="timed loader batches of each variant (at most "
                        "what the set holds)")
    parser.add_argument("--photos", type=int, default=4000, help="photo-sized JPEGs for prepare-data and the "
                        "loader (0: none)")
    parser.add_argument("--photo-side", type=int, default=384)
    parser.add_argument("--photo-hr", type=int, default=224, help="the loaders' HR crop on the photos")
    parser.add_argument("--main-threads", type=int, help="intra-op threads of this process while the loaders run "
                        "(default: the cores the loader workers leave, at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loader and prepare-data rate (the "
                        "median is kept)")
    parser.add_argument("--device", default="cpu", help="where the loaders' batches go (cuda: the project's pair "
                        "is made there by its kernel); results of cuda go to data_scale-cuda.{json,md}")
    parser.add_argument("--baseline-commit", help="also measure the hand-rolled data parallelism of this commit")
    parser.add_argument("--loader-baseline", metavar="COMMIT", help="also time the project's photo loader on the "
                        "library of this commit (key project@COMMIT)")
    parser.add_argument("--max-side", type=int, nargs="+", default=[], metavar="N", help="also prepare the photos "
                        "with these max_side and time the project's loader on them (key project_max_side_N)")
    parser.add_argument("--work", default=str(HERE.parents[1] / "runs" / "bench-data-scale"))
    parser.add_argument("--results", default=str(HERE.parents[1] / "bench" / "results"))
    parser.add_argument("--child", choices=("rss", "ddp", "loader"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "loader":
        from kd_lib.eval.cost import torch_threads
        with torch_threads(args.main_threads):
            rate = project_rate(args.data, args.side, args.workers, args.batches, torch.device(args.device))
        print(json.dumps({"img_per_s": rate}), flush=True)
        return 0
    if args.child:
        rate = train_steps(args.data, args.side)
        if int(os.environ.get("RANK", "0")) == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"steps_per_s": rate, "peak_rss_mib": peak}), flush=True)
        return 0
    if min(args.sizes) < BATCH * TRAIN_STEPS:
        parser.error(f"--sizes: each must be at least {BATCH * TRAIN_STEPS}, the images trained on")
    if args.max_side and min(args.max_side) < args.photo_hr:
        parser.error(f"--max-side: each must be at least --photo-hr ({args.photo_hr}), as a training stage requires")
    device = torch.device(args.device)
    main_threads = args.main_threads or max(1, len(os.sched_getaffinity(0)) - args.workers)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources, data = {}, {}
    for count in sorted(args.sizes):
        sources[count] = write_images(work / f"images-{count}-{args.side}px", count, args.side)
        data[count] = str(work / f"data-{count}-{args.side}px")
        prepare_imagefolder(str(sources[count]), data[count])
    smallest = min(args.sizes)
    smallest_images = count_images(sources[smallest])
    result = {"setup": {"sizes": sorted(args.sizes), "side": args.side, "workers": args.workers,
                        "batches": args.batches, "main_threads": main_threads, "repeats": args.repeats,
                        "train_steps": TRAIN_STEPS, "batch": BATCH, "device": str(device),
                        "photos": args.photos, "photo_side": args.photo_side, "photo_hr": args.photo_hr,
                        "baseline_commit": args.baseline_commit, "loader_baseline": args.loader_baseline,
                        "max_side": args.max_side},
              "rss_mib": {str(n): child("rss", data[n], args.side)["peak_rss_mib"] for n in sorted(args.sizes)},
              "loader_img_per_s": median_rate(lambda: loader_rates(sources[smallest], data[smallest], args.side,
                                                                   args.workers, args.batches, device, main_threads),
                                              args.repeats),
              "prepare_img_per_s": median_rate(lambda: prepare_rates(sources[smallest], work, smallest_images),
                                               args.repeats),
              "ddp_steps_per_s": {"ddp": child("ddp", data[smallest], args.side)["steps_per_s"]}}
    if args.photos:
        photos = write_images(work / f"photos-{args.photos}-{args.photo_side}px", args.photos, args.photo_side,
                              ".jpg", grain=PHOTO_GRAIN)
        photo_data = str(work / f"photos-data-{args.photos}-{args.photo_side}px")
        prepare_imagefolder(str(photos), photo_data)
        bounded = {f"project_max_side_{n}": str(work / f"photos-data-{args.photos}-{args.photo_side}px-max{n}")
                   for n in args.max_side}
        for n, copy in zip(args.max_side, bounded.values()):
            prepare_imagefolder(str(photos), copy, max_side=n)
        libraries = ({f"project@{args.loader_baseline}": baseline_library(args.loader_baseline, work)}
                     if args.loader_baseline else {})
        result["loader_img_per_s_photos"] = median_rate(lambda: loader_rates(
            photos, photo_data, args.photo_hr, args.workers, args.batches, device, main_threads, bounded, libraries),
            args.repeats)
        if bounded:
            result["shard_mib_photos"] = {"original": shard_mib(photo_data),
                                          **{name.removeprefix("project_"): shard_mib(copy)
                                             for name, copy in bounded.items()}}
        photo_images = count_images(photos)
        result["prepare_img_per_s_photos"] = median_rate(lambda: prepare_rates(photos, work, photo_images),
                                                         args.repeats)
    if args.baseline_commit:
        library = baseline_library(args.baseline_commit, work)
        result["ddp_steps_per_s"]["hand_rolled"] = child("ddp", data[smallest], args.side,
                                                         {"DATA_SCALE_LIBRARY": str(library)})["steps_per_s"]
    result["missed"] = misses(result)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    name = "data_scale" if device.type == "cpu" else f"data_scale-{device.type}"
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text(table)
    print(table + "".join(f"missed: {line}\n" for line in result["missed"]), end="")
    return 1 if result["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())

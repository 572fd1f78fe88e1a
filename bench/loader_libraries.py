"""Which library should read prepared data? The project's reader against mosaicml-streaming and litdata.

The three read the same images, the training split of a generated ImageFolder
(``--images`` PNGs of ``--side`` px, :func:`official_style.write_images`),
each from its own copy of the PNG bytes: the project's Parquet shards
(prepare-data), mosaicml-streaming's MDS shards (``MDSWriter``) and litdata's
chunks (``litdata.optimize``), written in the same order. Every loader gives
the same item, the image decoded and cropped by the project's
:class:`~kd_lib.data.transforms.CropTransform` (uint8, ``--side`` px) and its
label, through a torch ``DataLoader`` with ``--workers`` workers and batches
of 64, in its own shuffled order (the project's: its windowed shuffle,
:class:`~kd_lib.data.sampler.EpochBatchSampler`). Measures:

- ``loader_img_per_s``: items per second, timed from the end of the first
  batch over ``--batches`` batches, the median of ``--repeats`` runs. Each
  run is a fresh Python process (``--measure``), and the libraries take
  turns, so that no library's leftover processes or page cache favour one
  over another;
- ``write_s``: the seconds each took to write its copy, with one process
  (prepare-data also decodes, checks and hashes every image; the others
  copy the bytes).

Each run's process runs the intra-op threads the loader workers leave, as
in ``bench/data_scale.py``.

The libraries are not the project's dependencies (mosaicml-streaming would
take numpy back to 2.1 and add 36 packages), so this runs in an
environment of its own::

    python3.11 -m venv /tmp/libs && /tmp/libs/bin/pip install -e . mosaicml-streaming litdata
    /tmp/libs/bin/python bench/loader_libraries.py

Writes ``bench/results/loader_libraries.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litdata  # noqa: E402
import streaming  # noqa: E402

from data_scale import RATIO, child_output, figure, timed, timed_rate  # noqa: E402
from kd_lib.data.imagefolder import decode_rgb, list_classes, list_images  # noqa: E402
from kd_lib.data.sampler import EpochBatchSampler  # noqa: E402
from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder  # noqa: E402
from kd_lib.data.transforms import CropTransform  # noqa: E402
from kd_lib.eval.cost import torch_threads  # noqa: E402
from official_style import write_images  # noqa: E402

HERE = Path(__file__).resolve()
BATCH = 64


def sample(path: Path, label: int) -> dict:
    """One training image as the libraries store it: its PNG bytes and its label."""
    return {"image": path.read_bytes(), "label": label}


def write_mds(records: list[tuple[Path, int]], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own copy, of an earlier run
    with streaming.MDSWriter(out=str(out), columns={"image": "bytes", "label": "int"}) as writer:
        for path, label in records:
            writer.write(sample(path, label))


def litdata_sample(record: tuple[str, int]) -> dict:
    return sample(Path(record[0]), record[1])


def write_litdata(records: list[tuple[Path, int]], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    litdata.optimize(fn=litdata_sample, inputs=[(str(path), label) for path, label in records],
                     output_dir=str(out), chunk_bytes="4MB", num_workers=1, mode="overwrite")


class MosaicCrops(streaming.StreamingDataset):
    """mosaicml-streaming's dataset of the MDS copy, its items cropped as the project's."""

    def __init__(self, local: str, transform: CropTransform):
        super().__init__(local=local, shuffle=True, shuffle_seed=0, batch_size=BATCH)
        self.crop = transform

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return self.crop(decode_rgb(item["image"], "mds"), int(index)), item["label"]


class LitdataCrops(litdata.StreamingDataset):
    """litdata's dataset of its copy, its items cropped as the project's."""

    def __init__(self, input_dir: str, transform: CropTransform):
        super().__init__(input_dir=input_dir, shuffle=True, seed=0)
        self.crop = transform

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return self.crop(decode_rgb(item["image"], "litdata"), index.index), item["label"]  # a ChunkedIndex


def loader(name: str, copy: str, transform: CropTransform, workers: int, batches: int) -> torch.utils.data.DataLoader:
    """A fresh loader of ``batches + 1`` batches over library ``name``'s copy at ``copy``."""
    if name == "project":
        dataset = ShardedImageDataset(copy, "train", transform)
        sampled = list(EpochBatchSampler(len(dataset), BATCH, seed=0, epoch=0, blocks=dataset.blocks))
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampled[:batches + 1], num_workers=workers)
    dataset = (MosaicCrops if name == "mosaicml-streaming" else LitdataCrops)(copy, transform)
    return torch.utils.data.DataLoader(FirstStreamedItems(dataset, BATCH * (batches + 1)), batch_size=BATCH,
                                       num_workers=workers)


class FirstStreamedItems(torch.utils.data.IterableDataset):
    """The first ``count`` items a streaming dataset gives (over all loader workers)."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        share = self.count // (info.num_workers if info else 1)
        for number, item in enumerate(self.dataset):
            if number == share:
                return
            yield item


def measure(name: str, copy: str, side: int, workers: int, batches: int) -> float:
    """One run of library ``name``'s loader over its copy: items per second."""
    transform = CropTransform(side, RATIO, train=True)
    with torch_threads(max(1, len(os.sched_getaffinity(0)) - workers)):  # as bench/data_scale.py's loaders
        return timed_rate(loader(name, copy, transform, workers, batches), lambda batch: None,
                          torch.device("cpu"))


def measured_in_child(name: str, copy: str, args: argparse.Namespace) -> float:
    """:func:`measure` in a fresh Python process."""
    command = [sys.executable, str(HERE), "--measure", name, copy, "--side", str(args.side),
               "--workers", str(args.workers), "--batches", str(args.batches)]
    return float(child_output(command, f"bench/loader_libraries.py: the {name} run").split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(HERE.parents[1] / "runs" / "bench-loader-libraries"))
    parser.add_argument("--results", default=str(HERE.parents[1] / "bench" / "results"))
    parser.add_argument("--measure", nargs=2, metavar=("LIBRARY", "COPY"),
                        help="time one run of LIBRARY's loader over COPY and print its rate (used by the runs)")
    args = parser.parse_args(argv)
    if args.measure:
        print(measure(*args.measure, args.side, args.workers, args.batches))
        return 0
    work = Path(args.work)
    source = write_images(work / f"images-{args.images}-{args.side}px", args.images, args.side)
    records = [(source / record.path, record.label) for record in list_images(str(source), list_classes(str(source)))
               if record.split == "train"]
    copies = {name: str(work / name) for name in ("project", "mosaicml-streaming", "litdata")}
    write_s = {"project": timed(lambda: prepare_imagefolder(str(source), copies["project"])),
               "mosaicml-streaming": timed(lambda: write_mds(records, Path(copies["mosaicml-streaming"]))),
               "litdata": timed(lambda: write_litdata(records, Path(copies["litdata"])))}
    runs = {name: [] for name in copies}
    for repeat in range(args.repeats):
        for name, copy in copies.items():
            runs[name].append(measured_in_child(name, copy, args))
            print(f"run {repeat + 1}/{args.repeats}: {name} {runs[name][-1]:.0f} img/s", flush=True)
    result = {"setup": {"images": len(records), "side": args.side, "workers": args.workers, "batches": args.batches,
                        "repeats": args.repeats, "versions": {"mosaicml-streaming": streaming.__version__,
                                                              "litdata": litdata.__version__}},
              "loader_img_per_s": {name: statistics.median(rates) for name, rates in runs.items()},
              "loader_runs": runs,
              "write_s": write_s}
    lines = ["| library | loader img/s | write s |", "|---|---:|---:|"]
    lines += [f"| {name} | {figure(result['loader_img_per_s'][name])} | {figure(write_s[name])} |" for name in copies]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "loader_libraries.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "loader_libraries.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

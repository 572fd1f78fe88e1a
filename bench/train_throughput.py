"""How fast does the student stage train, against a loop in the style of Pixel Distillation's official code?

Both variants train the same task on the same generated images with the same
batch size: one-stage pixel distillation (``kd+isrd``: CE, logit KD and
ISRD), a frozen ``--teacher`` at HR (ResNet-50 at 224 px by default), a
``--student`` at LR (ResNet-18 at 56 px), the teacher's forward every step.

- ``project``: the stage's own path. Prepared Parquet shards, workers that
  ship uint8 crops, the HR/LR pair made on the device
  (:func:`kd_lib.ops.paired_resize`, one kernel on CUDA), bf16 autocast and
  channels-last on CUDA, the loop of :func:`kd_lib.engine.loop.fit`
  (checkpoints included). Its rate is the second epoch's training
  images/s, so start-up and the first epoch's warm-up are left out.
- ``official_style``: a plain loop as the official code writes it:
  torchvision ``ImageFolder`` with ``RandomResizedCrop``, ``ToTensor`` and
  ``Normalize``, the HR and LR tensors both made in the loader's workers,
  float32, default memory format. Its rate is timed over ``--steps`` steps
  after ``WARMUP`` steps.

Writes ``bench/results/train-throughput-<device>.json`` and ``.md`` and prints
the table::

    python bench/train_throughput.py                      # the GPU when there is one: 224 -> 56 px
    python bench/train_throughput.py --device cpu --hr-size 32 --teacher resnet18 --batch-size 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder  # noqa: E402
from kd_lib.data.transforms import CropTransform  # noqa: E402
from kd_lib.distill.methods import DistillSettings, build_distiller  # noqa: E402
from kd_lib.engine.loop import fit, resolve_device  # noqa: E402
from kd_lib.engine.settings import TrainSettings  # noqa: E402
from official_style import CLASSES, PairedFolder, write_images  # noqa: E402

WARMUP = 5
METHOD = "kd+isrd"


def build_task(args: argparse.Namespace):
    torch.manual_seed(0)
    teacher = getattr(torchvision.models, args.teacher)(num_classes=CLASSES).eval()
    student = getattr(torchvision.models, args.student)(num_classes=CLASSES)
    return build_distiller(DistillSettings(method=METHOD), student, teacher, hr_size=args.hr_size,
                           student_input_size=args.hr_size // args.ratio)


def project_rate(args: argparse.Namespace, data: str, device: torch.device) -> float:
    """The second epoch's training images/s of :func:`fit` on the prepared shards (checkpoints in a
    folder of their own, removed after)."""
    dataset = ShardedImageDataset(data, "train", CropTransform(args.hr_size, args.ratio, train=True))
    fast = device.type == "cuda"
    settings = TrainSettings(epochs=2, batch_size=args.batch_size, device=str(device), amp=fast,
                             channels_last=fast, num_workers=args.num_workers)
    with tempfile.TemporaryDirectory() as checkpoints:
        rows = fit(build_task(args), dataset, settings, checkpoints, lambda student, device: {}, desc="project")
    return rows[-1]["images_per_second"]


def official_style_rate(args: argparse.Namespace, source: Path, device: torch.device) -> float:
    """Training images/s of a plain float32 loop over ``PairedFolder``, after ``WARMUP`` steps."""
    task = build_task(args).to(device)
    optimizer = torch.optim.SGD(task.optimized_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(PairedFolder(str(source / "train"), args.hr_size, args.ratio),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    task.train()
    steps, started = 0, None
    while steps < WARMUP + args.steps:
        for hr, lr, labels in loader:
            if steps == WARMUP:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            loss, _ = task(hr.to(device, non_blocking=True), lr.to(device, non_blocking=True),
                           labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == WARMUP + args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def markdown(result: dict) -> str:
    setup, rates = result["setup"], result["images_per_second"]
    lines = [f"Device: {result['device']} (torch {torch.__version__}); {setup['teacher']} at {setup['hr_size']} px "
             f"-> {setup['student']} at {setup['hr_size'] // setup['ratio']} px, {METHOD}, batch "
             f"{setup['batch_size']}, {setup['num_workers']} loader workers", "",
             "| variant | images/s | vs official style |", "|---|---:|---:|"]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:.1f} | {rate / rates['official_style']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hr-size", type=int, default=224)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200,
                        help="timed steps of each variant (the project: its second epoch, its loader's start included)")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-train-throughput"),
                        help="where the generated images and their shards go")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    work = Path(args.work)
    count = args.batch_size * max(args.steps, WARMUP + args.steps)
    source = work / f"images-{args.hr_size}-{count}"
    write_images(source, count, round(args.hr_size * 1.15), ".jpg")
    data = str(work / f"data-{args.hr_size}-{count}")
    prepare_imagefolder(str(source), data)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "setup": {key: getattr(args, key) for key in ("hr_size", "ratio", "teacher", "student", "batch_size",
                                                            "steps", "num_workers")} | {"method": METHOD},
              "images_per_second": {"project": project_rate(args, data, device),
                                    "official_style": official_style_rate(args, source, device)}}
    table = markdown(result)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"train-throughput-{device.type}"
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

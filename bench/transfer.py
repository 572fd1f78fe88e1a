"""Does starting from pretrained weights help? Transfer between two halves of a real dataset.

On a real ImageFolder (default ``../shared/data/tiny-imagenet-10``, 10 classes):

1. prepare-data twice with ``categories``: classes A (the first five) and B
   (the other five);
2. the teacher architecture trained on A from scratch (the "pretrained" model);
3. for each seed, the teacher trained on B twice, with the same epochs and
   settings: from scratch, and from the A model (``weights: <A model folder>``,
   the stages' fine-tuning recipe: the tensors taken from it at
   ``weights_lr_scale x lr``, here the head too, since A and B both have five classes).

Reports the final val top-1 on B of both, mean and sample std over the
seeds. Sized to run in minutes on a shared CPU: a ResNet-18 at 32 px,
``max_per_class`` train images per class, few epochs; the numbers are
small-scale and noisy, not ImageNet-scale transfer. Writes
``bench/results/transfer.json`` and prints the table::

    OMP_NUM_THREADS=1 python bench/transfer.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components import prepare_data, teacher  # noqa: E402
from kd_lib.config import from_dict  # noqa: E402
from kd_lib.data.imagefolder import list_classes  # noqa: E402

SETTINGS = {"arch": "resnet18", "hr_size": 32, "ratio": 4, "batch_size": 32, "lr": 0.05, "num_workers": 0,
            "device": "cpu", "amp": False}
#: 30 train and 30 val images per class: about ten minutes on two shared CPU cores.
SIZE = {"max_per_class": 30, "pretrain_epochs": 6, "epochs": 3, "seeds": [0, 1, 2]}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def run(data: str, out: Path, size: dict) -> dict:
    classes = list_classes(data)
    halves = {"A": classes[:5], "B": classes[5:10]}
    prepared = {}
    for half, names in halves.items():
        prepared[half] = str(out / f"data-{half}")
        prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
            "source": data, "out": prepared[half], "categories": names, "max_per_class": size["max_per_class"]}))

    def train(name: str, data_uri: str, epochs: int, seed: int, weights: str = "") -> dict:
        start = time.perf_counter()
        manifest = teacher.run(from_dict(teacher.TeacherConfig, {
            **SETTINGS, "data": data_uri, "out": str(out / name), "epochs": epochs, "seed": seed,
            "weights": weights}))
        return {"top1": manifest["final"]["val_top1"], "seconds": time.perf_counter() - start}

    pretrained = train("pretrain-A", prepared["A"], size["pretrain_epochs"], 0)
    runs = {"scratch": [], "pretrained": []}
    for seed in size["seeds"]:
        runs["scratch"].append(train(f"B-scratch-{seed}", prepared["B"], size["epochs"], seed))
        runs["pretrained"].append(train(f"B-pretrained-{seed}", prepared["B"], size["epochs"], seed,
                                        weights=str(out / "pretrain-A")))
    results = {}
    for name, rows in runs.items():
        top1 = [r["top1"] for r in rows]
        mean, std = mean_std(top1)
        results[name] = {"top1": top1, "top1_mean": mean, "top1_std": std,
                         "train_seconds": sum(r["seconds"] for r in rows)}
    return {"data": data, "classes": halves, "settings": SETTINGS, "size": size,
            "pretrain_top1_on_A": pretrained["top1"], "results": results}


def table(report: dict) -> str:
    lines = ["| start on B | val top-1 % (mean ± std, 3 seeds) | per seed |", "|---|---|---|"]
    for name, r in report["results"].items():
        std = f" ± {100 * r['top1_std']:.1f}" if r["top1_std"] is not None else ""
        lines.append(f"| {name} | {100 * r['top1_mean']:.1f}{std} | "
                     f"{', '.join(f'{100 * t:.1f}' for t in r['top1'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tiny-imagenet-10"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-transfer"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "transfer.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = run(args.data, Path(args.out), SIZE)
    report["wall_seconds"] = time.perf_counter() - start
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"pretrained on A: val top-1 {100 * report['pretrain_top1_on_A']:.1f}%; "
          f"{report['wall_seconds'] / 60:.1f} min; {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of the HR accuracy does each method keep at LR, and at what cost?

Trains on a real ImageFolder (default ``../shared/data/tiny-imagenet-10``, HR
64 px): the teacher (ResNet-34, HR, CE) and the assistant (ResNet-18, HR, KD
from the teacher) once, then, for each ratio and seed, the ResNet-18 LR
student with every method of the student stage, and the LR baseline (CE
alone). Every LR student sees the same data, settings and epochs:

- ``tas``: starts from the assistant's weights, distilled from it;
- every other method: a fresh student distilled from the assistant, used as
  the same-architecture HR teacher (so that FitNet, AT, SP and the TAS feature
  pair layer to layer), ``kd+isrd`` being one-stage pixel distillation.

Stage outputs are reused: a rerun skips what is done, so an interrupted
benchmark resumes where it stopped. Writes ``bench/results/quality.json``,
``quality.md`` (the table) and ``quality.png`` (the plot); with ``--quick``
``quality-quick.*``, and with ``--ratios`` other than 2 and 4, say ``--ratios 2``,
``quality-ratio2.*``, so that a run of one ratio keeps the other's results.
Prints the table::

    python bench/quality.py            # the full table
    python bench/quality.py --quick    # a few minutes: 20 images per class, 1 epoch, 2 seeds
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.stage import find  # noqa: E402
from kd_lib.config import from_dict  # noqa: E402
from kd_lib.engine.loop import NonFiniteLossError  # noqa: E402
from kd_lib.eval.cost import count_gflops, input_bytes  # noqa: E402
from kd_lib.io.fs import join, read_bytes  # noqa: E402
from kd_lib.io.manifest import read_published  # noqa: E402
from kd_lib.models.store import load_classifier  # noqa: E402

#: Student methods in table order; ``lr_baseline`` is the LR student with CE alone.
METHODS = ("lr_baseline", "kd", "fitnet", "at", "sp", "dkd", "crkd", "kd+isrd", "tas")
TEACHER_ARCH, STUDENT_ARCH = "resnet34", "resnet18"
FULL = {"max_per_class": 0, "teacher_epochs": 12, "assistant_epochs": 10, "student_epochs": 4,
        "seeds": [0, 1, 2]}
#: Every LR student's learning rate (Pixel Distillation's official CNN lr).
STUDENT_LR = 0.01
QUICK = {"max_per_class": 20, "teacher_epochs": 1, "assistant_epochs": 1, "student_epochs": 1,
         "seeds": [0, 1]}


def train(stage: str, uri: str, **fields) -> tuple[str, float]:
    """Run a stage (a no-op when its output is up to date); its URI and training seconds
    (the epochs' training, validation excluded)."""
    declared = find(stage)
    declared.run(from_dict(declared.config, {"out": uri, **fields}, where=stage))
    rows = pq.read_table(io.BytesIO(read_published(uri, "metrics.parquet"))).to_pylist()
    return uri, sum(row["training_seconds"] for row in rows)


def final_top1(uri: str) -> float:
    return json.loads(read_bytes(join(uri, "manifest.json")))["final"]["val_top1"]


def cost(uri: str) -> tuple[float, int]:
    model, meta = load_classifier(uri)
    return count_gflops(model, meta["input_size"]), input_bytes(meta["input_size"])


def row(method: str, ratio: int, arch: str, seeds: list[int], uris: list[str | None],
        seconds: list[float]) -> dict:
    """One table row; a ``None`` URI is a seed whose loss diverged (listed, not averaged)."""
    finished = [(seed, uri) for seed, uri in zip(seeds, uris) if uri is not None]
    if not finished:
        raise SystemExit(f"ratio {ratio} {method}: every seed diverged; see the errors above")
    top1 = [100 * final_top1(uri) for _, uri in finished]
    gflops, size = cost(finished[0][1])
    return {"method": method, "ratio": ratio, "arch": arch, "seeds": [seed for seed, _ in finished],
            "diverged_seeds": [seed for seed, uri in zip(seeds, uris) if uri is None], "top1": top1,
            "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "gflops": gflops, "input_bytes": size, "train_seconds": statistics.fmean(seconds)}


def verdict(result: dict, baseline: dict) -> str:
    """Does ``result`` beat the LR baseline? "yes", "no", or "within noise" when the
    difference of means is under two standard errors."""
    diff = result["top1_mean"] - baseline["top1_mean"]
    variances = [r["top1_std"] ** 2 / len(r["top1"]) for r in (result, baseline) if r["top1_std"] is not None]
    noise = 2 * math.sqrt(sum(variances)) if len(variances) == 2 else 0.0
    if abs(diff) <= noise:
        return f"within noise ({diff:+.1f})"
    return f"{'yes' if diff > 0 else 'no'} ({diff:+.1f})"


def markdown(results: list[dict]) -> str:
    """The table: mean ± std of top-1, costs, and the comparison with the LR baseline."""
    assistant_top1 = next(r["top1_mean"] for r in results if r["method"] == "assistant")
    lines = ["| method | ratio | input px | top-1 % (mean ± std) | seeds | kept of HR assistant | "
             "beats LR baseline? | GFLOPs | input bytes | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        baseline = next((r for r in results if r["method"] == "lr_baseline" and r["ratio"] == result["ratio"]),
                        None)
        std = f" ± {result['top1_std']:.1f}" if result["top1_std"] is not None else ""
        if result["diverged_seeds"]:
            std += f" (diverged: seeds {result['diverged_seeds']})"
        compared = verdict(result, baseline) if baseline and result is not baseline else "–"
        side = int(math.isqrt(result["input_bytes"] // 3))
        lines.append(f"| {result['method']} | {result['ratio']} | {side} | {result['top1_mean']:.1f}{std} | "
                     f"{len(result['seeds'])} | {100 * result['top1_mean'] / assistant_top1:.0f} % | {compared} | "
                     f"{result['gflops']:.3f} | {result['input_bytes']} | {result['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict]) -> bytes:
    """PNG: top-1 of each LR method per ratio (mean, and one std as an error bar),
    against the HR assistant and each ratio's LR baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    students = [r for r in results if r["ratio"] > 1]
    methods = list(dict.fromkeys(r["method"] for r in students))
    ratios = sorted({r["ratio"] for r in students})
    fig = Figure(figsize=(7, 0.45 * len(methods) + 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / len(ratios)
    for k, ratio in enumerate(ratios):
        rows = {r["method"]: r for r in students if r["ratio"] == ratio}
        ys = [i + (k - (len(ratios) - 1) / 2) * height for i, m in enumerate(methods) if m in rows]
        shown = [rows[m] for m in methods if m in rows]
        side = math.isqrt(shown[0]["input_bytes"] // 3)
        bars = ax.barh(ys, [r["top1_mean"] for r in shown], height, xerr=[r["top1_std"] or 0 for r in shown],
                       label=f"ratio {ratio} ({side} px)", capsize=2)
        if "lr_baseline" in rows:
            ax.axvline(rows["lr_baseline"]["top1_mean"], color=bars.patches[0].get_facecolor(), ls=":", lw=1)
    for r in results:
        if r["ratio"] == 1:
            ax.axvline(r["top1_mean"], color="black", ls="--" if r["method"] == "assistant" else "-.", lw=1,
                       label=f"{r['method']} (HR, {r['arch']})")
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    lowest = min(r["top1_mean"] - (r["top1_std"] or 0) for r in students)
    ax.set_xlim(left=max(0.0, 5 * math.floor(lowest / 5) - 5))
    ax.set_xlabel("validation top-1 % (dotted: each ratio's LR baseline)")
    fig.legend(loc="outside lower center", ncol=2, fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tiny-imagenet-10"))
    parser.add_argument("--out", help="stage outputs (default runs/bench-quality[-quick])")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--quick", action="store_true", help="a small subset, 1 epoch, 2 seeds")
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--student-epochs", type=int)
    parser.add_argument("--hr-size", type=int, default=64)
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.seeds:
        plan["seeds"] = args.seeds
    if args.student_epochs:
        plan["student_epochs"] = args.student_epochs
    stages = "quality-quick" if args.quick else "quality"
    out = args.out or str(ROOT / "runs" / f"bench-{stages}")
    every_ratio = sorted(args.ratios) == parser.get_default("ratios")
    name = stages if every_ratio else f"{stages}-ratio" + "-".join(map(str, args.ratios))
    if not Path(args.data).is_dir() and "://" not in args.data:
        parser.error(f"--data {args.data}: no such dataset folder")

    started = time.monotonic()
    data = join(out, "data")
    prepare = find("prepare-data")
    prepare.run(from_dict(prepare.config, {"source": args.data, "out": data, "max_per_class": plan["max_per_class"]}))
    shared = {"data": data, "hr_size": args.hr_size, "seed": 0}
    teacher_uri, teacher_s = train("teacher", join(out, "teacher"), arch=TEACHER_ARCH,
                                   epochs=plan["teacher_epochs"], lr=0.05, **shared)
    assistant_uri, assistant_s = train("assistant", join(out, "assistant"), arch=STUDENT_ARCH, teacher=teacher_uri,
                                       epochs=plan["assistant_epochs"], lr=0.05, **shared)
    results = [row("teacher", 1, TEACHER_ARCH, [0], [teacher_uri], [teacher_s]),
               row("assistant", 1, STUDENT_ARCH, [0], [assistant_uri], [assistant_s])]
    epochs = plan["student_epochs"]
    for ratio in args.ratios:
        for method in args.methods:
            uris, seconds = [], []
            for seed in plan["seeds"]:
                fields = {"data": data, "hr_size": args.hr_size, "ratio": ratio, "seed": seed, "arch": STUDENT_ARCH,
                          "epochs": epochs, "lr": STUDENT_LR}
                uri = join(out, f"ratio{ratio}", method.replace("+", "_"), f"seed{seed}")
                try:
                    if method == "lr_baseline":
                        done = train("lr-baseline", uri, **fields)
                    else:
                        source = {"assistant" if method == "tas" else "teacher": assistant_uri}
                        done = train("student", uri, method=method, **source, **fields)
                except NonFiniteLossError as err:
                    print(f"ratio {ratio} {method} seed {seed} diverged: {err}", file=sys.stderr, flush=True)
                    uris.append(None)
                    continue
                uris.append(done[0])
                seconds.append(done[1])
            results.append(row(method, ratio, STUDENT_ARCH, plan["seeds"], uris, seconds))
            print(f"ratio {ratio} {method}: top-1 {results[-1]['top1_mean']:.1f} "
                  f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)

    table = markdown(results)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    setup = {"data": args.data, "hr_size": args.hr_size, "ratios": args.ratios, "teacher_arch": TEACHER_ARCH,
             "student_arch": STUDENT_ARCH, **plan, "student_lr": STUDENT_LR,
             "wall_seconds": time.monotonic() - started}
    (results_dir / f"{name}.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(table)
    (results_dir / f"{name}.png").write_bytes(plot(results))
    print(table)
    print(f"wrote {results_dir / name}.json, .md and .png in {setup['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

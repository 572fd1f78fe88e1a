"""Does the demo show what distillation is for, on every seed?

Runs the demo, ``kdp run --seed S`` without ``--data`` (the generated dataset
of :mod:`kd_lib.data.demo`, the same for every seed, and the demo settings),
for each seed, and checks its table: the HR teacher at least
:data:`TEACHER_MARGIN` points of top-1 above the LR baseline, and the TAS
student at least :data:`STUDENT_MARGIN` above it. Writes
``bench/results/demo_seeds.json`` (every model's top-1 per seed, the mean and
std, the wall seconds of each run, the verdicts) and prints the table; exits
with status 1 when a seed misses a margin::

    python bench/demo_seeds.py               # seeds 0 1 2, a few minutes each on 2 CPU cores

A run folder that already holds a finished run answers from KFP's cache: its
``wall_seconds`` then times the cache, not the training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.cli import DEMO_DATA, DEMO_SETTINGS  # noqa: E402

MODELS = ("teacher", "assistant", "student", "student_onestage", "lr_baseline")
#: The demo's promise, in top-1 points above the LR baseline, for every seed.
TEACHER_MARGIN, STUDENT_MARGIN = 15.0, 5.0


def shortfalls(top1: dict[str, float], teacher_margin: float = TEACHER_MARGIN,
               student_margin: float = STUDENT_MARGIN) -> list[str]:
    """What a run's top-1 per model (percent) misses of the promise; empty when it holds."""
    baseline = top1["lr_baseline"]
    missed = []
    for name, margin in (("teacher", teacher_margin), ("student", student_margin)):
        if top1[name] < baseline + margin:
            missed.append(f"{name} {top1[name]:.2f} < lr_baseline {baseline:.2f} + {margin:g}")
    return missed


def run_demo(seed: int, out: Path) -> tuple[dict[str, float], float]:
    """``kdp run --seed SEED --out OUT``: top-1 (percent) per model and the wall seconds."""
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--seed", str(seed), "--out", str(out)],
                   cwd=ROOT, env=env, check=True)
    seconds = time.monotonic() - started
    summary = json.loads((out / "summary.json").read_text())
    return {m["name"]: 100 * m["top1"] for m in summary["models"]}, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-demo-seeds"), help="one run folder per seed")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)

    runs = []
    for seed in args.seeds:
        top1, seconds = run_demo(seed, Path(args.out) / f"seed{seed}")
        runs.append({"seed": seed, "top1": top1, "wall_seconds": round(seconds, 1), "shortfalls": shortfalls(top1)})
    models = [name for name in MODELS if all(name in run["top1"] for run in runs)]
    stats = {name: {"mean": statistics.fmean(run["top1"][name] for run in runs),
                    "std": statistics.stdev(run["top1"][name] for run in runs) if len(runs) > 1 else None}
             for name in models}
    result = {"command": "python bench/demo_seeds.py --seeds " + " ".join(map(str, args.seeds)),
              "demo_data": DEMO_DATA, "demo_settings": DEMO_SETTINGS, "cpu_count": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "margins": {"teacher": TEACHER_MARGIN, "student": STUDENT_MARGIN}, "runs": runs, "stats": stats}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo_seeds.json").write_text(json.dumps(result, indent=2) + "\n")

    print("\ntop-1 %  " + "  ".join(f"{name:>16}" for name in models) + "  wall s  verdict")
    for run in runs:
        verdict = "; ".join(run["shortfalls"]) or "ok"
        print(f"seed {run['seed']:<3} " + "  ".join(f"{run['top1'][name]:16.2f}" for name in models)
              + f"  {run['wall_seconds']:6.0f}  {verdict}")
    print(f"{'mean':<8} " + "  ".join(f"{stats[name]['mean']:16.2f}" for name in models))
    print(f"\n{results / 'demo_seeds.json'}")
    return 1 if any(run["shortfalls"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

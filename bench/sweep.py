"""Which input size and which student keep the HR accuracy on real images: ``kdp sweep`` per seed.

Runs ``kdp sweep --data DATA --ratios ... --student-archs ... --seed S`` once per ``--seeds``
(every task at its stage's defaults unless ``--set`` says otherwise: the teacher 12 epochs at
lr 0.05, the assistants 10 at 0.05, every LR student and its LR baseline 10 at 0.01, TAS from
the assistant), then pools
the seeds cell by cell (:class:`kd_lib.eval.sweep.Cell`: top-1 per seed, its mean ± the
standard error of the mean over seeds, or the binomial one with a single seed) and answers
again on the pooled cells: the Pareto fronts, and the cell chosen for ``--keep``.

Writes ``bench/results/sweep.json`` (the pooled summary, each seed's wall time, the
commands, the commit) and ``sweep.md`` (the table), and ``sweep.png`` (the fronts);
prints the table.

    .venv/bin/python bench/sweep.py --data ../shared/data/tiny-imagenet-10 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lib.eval.sweep import Budget, Cell, choose, format_table, sweep_summary  # noqa: E402
from kd_lib.eval.sweep_report import front_figure  # noqa: E402
from kd_lib.eval.verdicts import standard_error  # noqa: E402
from pipelines import cli, sweep  # noqa: E402


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict, float]:
    """One sweep: its summary and its wall seconds."""
    started = time.monotonic()
    out = Path(args.work) / f"seed{seed}"
    command = ["sweep", "--data", args.data, "--out", str(out), "--seed", str(seed), "--keep", str(args.keep),
               "--ratios", *map(str, args.ratios), "--student-archs", *args.student_archs,
               *(word for setting in args.set for word in ("--set", setting))]
    if cli.main(command) != 0:
        raise SystemExit(f"kdp {' '.join(command)} failed")
    return json.loads((out / "summary.json").read_text()), time.monotonic() - started


def pooled(summaries: list[dict]) -> tuple[list[Cell], float, float]:
    """The cells with one top-1 per seed, the mean reference top-1 and its standard error."""
    cells = {}
    for summary in summaries:
        for cell in map(Cell.from_dict, summary["cells"]):
            first = cells.setdefault(cell.key, cell)
            if first is not cell:
                cells[cell.key] = Cell(first.arch, first.ratio, first.input_size, first.top1 + cell.top1,
                                       first.baseline_top1 + cell.baseline_top1, first.val_images,
                                       first.input_bytes, first.gflops, first.latency_ms)
    references = [summary["reference_top1"] for summary in summaries]
    reference = sum(references) / len(references)
    n = summaries[0]["dataset"]["val_images"]
    return list(cells.values()), reference, standard_error(reference, n) / len(references) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tiny-imagenet-10"))
    parser.add_argument("--ratios", type=int, nargs="+", default=list(sweep.RATIOS))
    parser.add_argument("--student-archs", nargs="+", default=list(sweep.ARCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                        help="passed to kdp sweep, e.g. student.epochs=4 (every cell's student)")
    parser.add_argument("--work", default="runs/bench-sweep")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: no such dataset folder")
    runs = [run_seed(args, seed) for seed in args.seeds]
    cells, reference, reference_se = pooled([summary for summary, _ in runs])
    budget = Budget(keep=args.keep)
    choice = choose(cells, reference, reference_se, budget)
    table = format_table(cells, reference, choice)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    command = (f".venv/bin/python bench/sweep.py --data {args.data} --ratios {' '.join(map(str, args.ratios))} "
               f"--student-archs {' '.join(args.student_archs)} --seeds {' '.join(map(str, args.seeds))} "
               f"--keep {args.keep}" + "".join(f" --set {setting}" for setting in args.set))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    summary = {**sweep_summary(cells, reference, reference_se, budget, choice), "command": command, "commit": commit,
               "device": runs[0][0]["device"], "dataset": runs[0][0]["dataset"],
               "references": [summary["reference"] for summary, _ in runs],
               "wall_seconds": [round(seconds) for _, seconds in runs]}
    (results / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    front_figure(cells, choice, str(results / "sweep.png"))
    minutes = ", ".join(f"{seconds / 60:.0f}" for _, seconds in runs)
    (results / "sweep.md").write_text(
        f"`{command}` at {commit} on {summary['device']}; {len(runs)} seed(s), {minutes} min each. Top-1 on the "
        f"{summary['dataset']['val_images']} validation images; the reference is the best HR model "
        f"({', '.join(summary['references'])}), {100 * reference:.2f} %.\n\n```text\n{table}\n```\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

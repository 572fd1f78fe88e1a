"""What the seeded benchmarks share: one run of a ``kdp`` command per seed, and their table."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import cli  # noqa: E402


def run_seed(command: list[str], seed: int, out: Path, metric: str) -> dict:
    """``kdp COMMAND --seed SEED --out OUT/seedSEED``: every model's ``metric`` (in %) and the run's
    wall seconds."""
    started = time.monotonic()
    folder = out / f"seed{seed}"
    if cli.main([*command, "--seed", str(seed), "--out", str(folder)]) != 0:
        raise SystemExit(f"kdp {' '.join(command)} --seed {seed} failed")
    summary = json.loads((folder / "summary.json").read_text())
    return {"seed": seed, "wall_seconds": time.monotonic() - started,
            metric: {m["name"]: 100 * m[metric] for m in summary["models"]}}


def markdown(runs: list[dict], models: tuple[str, ...], metric: str, baseline: str = "lr_baseline") -> str:
    """Each model's ``metric`` per seed, its mean ± sample std, and its gap to ``baseline`` (mean ± std)."""
    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 \
            else f"{values[0]:.1f}"

    lines = ["| model | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean ± std | vs LR baseline |",
             "|---|" + "---:|" * (len(runs) + 2)]
    for name in models:
        values = [r[metric][name] for r in runs]
        gaps = [r[metric][name] - r[metric][baseline] for r in runs]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {cell(values)} | "
                     + ("–" if name == baseline else cell(gaps)) + " |")
    return "\n".join(lines) + "\n"

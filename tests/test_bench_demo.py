"""bench/demo.py: the demo's promises checked on each seed's table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_demo", ROOT / "bench" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, teacher, student, baseline):
    return {"seed": seed, "wall_seconds": 1.0, "top1": {"teacher": teacher, "assistant": teacher - 1,
                                                        "student": student, "student_onestage": student - 1,
                                                        "lr_baseline": baseline}}


def test_a_seed_that_misses_a_margin_is_named():
    bench = load_bench()
    assert bench.misses(run(0, 80.0, 60.0, 55.0)) == []
    assert bench.misses(run(1, 69.9, 60.0, 55.0)) == [
        "seed 1: teacher 69.90 is not 15 points above the LR baseline's 55.00"]
    assert bench.misses(run(2, 80.0, 59.9, 55.0)) == [
        "seed 2: student 59.90 is not 5 points above the LR baseline's 55.00"]


def test_the_table_gives_each_seed_and_the_mean_gap_to_the_baseline():
    table = load_bench().markdown([run(0, 80.0, 60.0, 55.0), run(1, 82.0, 64.0, 57.0)]).splitlines()
    assert table[0] == "| model | seed 0 | seed 1 | mean ± std | vs LR baseline |"
    assert table[2] == "| teacher | 80.00 | 82.00 | 81.0 ± 1.4 | 25.0 ± 0.0 |"
    assert table[4] == "| student | 60.00 | 64.00 | 62.0 ± 2.8 | 6.0 ± 1.4 |"
    assert table[6] == "| lr_baseline | 55.00 | 57.00 | 56.0 ± 1.4 | – |"

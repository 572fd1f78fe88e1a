"""bench/demo_seeds.py: the demo's promise, checked per seed (the runs themselves take minutes each)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "bench" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_seed_that_misses_a_margin_is_named():
    bench = load_bench()
    top1 = {"teacher": 80.0, "assistant": 75.0, "student": 52.0, "student_onestage": 50.0, "lr_baseline": 45.0}
    assert bench.shortfalls(top1) == []
    assert bench.shortfalls({**top1, "student": 49.0}) == ["student 49.00 < lr_baseline 45.00 + 5"]
    assert bench.shortfalls({**top1, "teacher": 59.0, "student": 44.0}) == [
        "teacher 59.00 < lr_baseline 45.00 + 15", "student 44.00 < lr_baseline 45.00 + 5"]

"""bench/ops.py on the CPU, at small sizes: every op and variant measured, the backend named."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("ops_bench", ROOT / "bench" / "ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_ops_on_the_cpu_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    bench = load_bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setitem(bench.SIZES, "cpu", {"resize": (2, 32, 4), "kd": (8, 10), "mmd": (6, 4)})
    assert bench.main(["--device", "cpu", "--repeats", "2"]) == 0
    result = json.loads((tmp_path / "ops-cpu.json").read_text())
    rows = {(r["op"], r["variant"]): r for r in result["rows"]}
    assert {op for op, _ in rows} == {"paired_resize", "kd_loss fwd+bwd", "mmd2 fwd+bwd"}
    assert {variant for _, variant in rows} == {"kd_lib op", "eager", "compiled"}
    for (op, variant), row in rows.items():
        assert row["ms"] > 0
        if variant == "kd_lib op":
            assert row["note"] == "PyTorch reference: no CUDA device"
    assert rows[("paired_resize", "eager")]["gb_per_s"] > 0
    assert rows[("mmd2 fwd+bwd", "eager")]["gb_per_s"] is None
    table = (tmp_path / "ops-cpu.md").read_text()
    assert table.startswith("Device: CPU") and table.count("\n| ") == 10

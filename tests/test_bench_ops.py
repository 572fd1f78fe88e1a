"""bench/ops.py on the CPU, at small sizes: every op and variant measured, the backend named."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("ops_bench", ROOT / "bench" / "ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SMALL = {"resize": (2, 32, 4), "kd": (8, 10), "mmd": (6, 4)}


@pytest.mark.slow
def test_bench_ops_on_the_cpu_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    bench = load_bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setitem(bench.SIZES, "cpu", SMALL)
    assert bench.main(["--device", "cpu", "--repeats", "2", "--calls", "2"]) == 0
    result = json.loads((tmp_path / "ops-cpu.json").read_text())
    assert (result["repeats"], result["calls"]) == (2, 2)
    rows = {(r["op"], r["variant"]): r for r in result["rows"]}
    assert {op for op, _ in rows} == {"paired_resize", "kd_loss fwd+bwd", "mmd2 fwd+bwd"}
    assert {variant for _, variant in rows} == {"kd_lib op", "eager", "compiled"}
    for (op, variant), row in rows.items():
        assert row["error_vs_eager"] <= bench.TOLERANCE, (op, variant)
        if variant == "eager":
            assert row["error_vs_eager"] == 0.0
        if variant == "kd_lib op":
            assert row["note"] == "PyTorch reference: no CUDA device"
    # bytes over time: the resize moves (1 + 4 + 4 / 16) bytes per input byte
    resize = rows[("paired_resize", "eager")]
    assert resize["gb_per_s"] == pytest.approx(2 * 32 * 32 * 3 * 5.25 / (resize["ms"] / 1e3) / 1e9)
    assert rows[("mmd2 fwd+bwd", "eager")]["gb_per_s"] is None
    table = (tmp_path / "ops-cpu.md").read_text()
    assert table.startswith("Device: CPU") and table.count("\n| ") == 10


def test_a_variant_whose_outputs_differ_from_eager_fails_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    bench = load_bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setitem(bench.SIZES, "cpu", SMALL)
    monkeypatch.setattr(bench, "kd_loss", lambda s, t, temperature: 1.01 * bench.plain_kd(s, t))
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)  # no compile: fast
    assert bench.main(["--device", "cpu", "--repeats", "1", "--calls", "1"]) == 1
    assert "kd_loss fwd+bwd kd_lib op: 1.0e-02" in capsys.readouterr().err


def test_timing_averages_back_to_back_calls() -> None:
    bench = load_bench()
    calls = []
    assert bench.time_calls(lambda: calls.append(time.sleep(0.01)), torch.device("cpu"), 5) >= 10
    assert len(calls) == 5

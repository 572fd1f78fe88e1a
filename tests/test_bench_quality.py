"""bench/quality.py --quick: the whole benchmark on a small subset of the real images."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tiny-imagenet-10"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not on this machine")
def test_quick_quality_benchmark_writes_every_row(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--data", str(DATA),
                    "--out", str(tmp_path / "runs"), "--results", str(tmp_path)], check=True)
    results = json.loads((tmp_path / "quality-quick.json").read_text())["results"]
    methods = ["lr_baseline", "kd", "fitnet", "at", "sp", "dkd", "crkd", "kd+isrd", "tas"]
    assert [(r["method"], r["ratio"]) for r in results] == (
        [("teacher", 1), ("assistant", 1)] + [(m, ratio) for ratio in (2, 4) for m in methods])
    for result in results[2:]:
        assert set(result) >= {"method", "ratio", "arch", "seeds", "top1", "top1_mean", "top1_std", "gflops",
                               "input_bytes", "train_seconds"}
        assert len(result["top1"]) == len(result["seeds"]) and result["diverged_seeds"] == []
        assert result["seeds"] == [0, 1] and result["top1_std"] is not None
        assert 0 <= min(result["top1"]) <= max(result["top1"]) <= 100
        assert result["input_bytes"] == 3 * (64 // result["ratio"]) ** 2
    by_ratio = {r["ratio"]: r["gflops"] for r in results if r["method"] == "kd"}
    assert by_ratio[4] < by_ratio[2] < results[1]["gflops"]
    table = (tmp_path / "quality-quick.md").read_text().splitlines()
    assert len(table) == 2 + len(results) and "beats LR baseline?" in table[0]
    assert (tmp_path / "quality-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

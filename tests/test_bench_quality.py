"""bench/quality.py --quick: the whole benchmark on a small subset of the real images."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kd_lib.io.manifest import published_uri

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tiny-imagenet-10"


def load_bench():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(method, top1, ratio=4):
    mean = sum(top1) / len(top1)
    std = (sum((x - mean) ** 2 for x in top1) / (len(top1) - 1)) ** 0.5 if len(top1) > 1 else None
    return {"method": method, "ratio": ratio, "arch": "resnet18", "seeds": list(range(len(top1))),
            "diverged_seeds": [], "top1": top1, "top1_mean": mean, "top1_std": std, "gflops": 0.031,
            "input_bytes": 3 * (64 // ratio) ** 2, "train_seconds": 1.0}


def test_the_table_says_when_a_method_does_not_beat_the_baseline():
    bench = load_bench()
    baseline = result("lr_baseline", [40.0, 41.0, 42.0])  # mean 41, std 1
    assert bench.verdict(result("kd", [45.0, 46.0, 47.0]), baseline) == "yes (+5.0)"
    assert bench.verdict(result("at", [35.0, 36.0, 37.0]), baseline) == "no (-5.0)"
    # a difference under two standard errors (2 * sqrt(1/3 + 1/3) = 1.63) is noise
    assert bench.verdict(result("sp", [41.0, 42.0, 43.0]), baseline) == "within noise (+1.0)"
    rows = [result("assistant", [50.0], ratio=1), baseline, result("at", [35.0, 36.0, 37.0])]
    table = bench.markdown(rows).splitlines()
    assert table[2].startswith("| assistant | 1 | 64 | 50.0 | 1 | 100 % | – |")
    assert table[4].startswith("| at | 4 | 16 | 36.0 ± 1.0 | 3 | 72 % | no (-5.0) |")


@pytest.mark.slow
@pytest.mark.requires(DATA.is_dir(), f"{DATA} is not on this machine (the shared test data)")
def test_quick_quality_benchmark_writes_every_row(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--data", str(DATA),
                    "--hr-size", "32", "--ratios", "4", "--out", str(tmp_path / "runs"), "--results", str(tmp_path)],
                   check=True)
    results = json.loads((tmp_path / "quality-quick-ratio4.json").read_text())["results"]
    methods = ["lr_baseline", "kd", "fitnet", "at", "sp", "dkd", "crkd", "kd+isrd", "tas"]
    assert [(r["method"], r["ratio"]) for r in results] == [("teacher", 1), ("assistant", 1),
                                                           *((m, 4) for m in methods)]
    for result in results[2:]:
        assert set(result) >= {"method", "ratio", "arch", "seeds", "top1", "top1_mean", "top1_std", "gflops",
                               "input_bytes", "train_seconds"}
        assert len(result["top1"]) == len(result["seeds"]) and result["diverged_seeds"] == []
        assert result["seeds"] == [0, 1] and result["top1_std"] is not None
        runs = [tmp_path / "runs" / f"ratio{result['ratio']}" / result["method"].replace("+", "_") / f"seed{seed}"
                for seed in result["seeds"]]
        assert result["top1"] == [100 * json.loads((run / "manifest.json").read_text())["final"]["val_top1"]
                                  for run in runs]  # each seed's own run, in order
        epochs = [pq.read_table(published_uri(str(run), "metrics.parquet")).to_pylist() for run in runs]
        training = sum(sum(row["training_seconds"] for row in rows) for rows in epochs) / len(runs)
        with_validation = sum(sum(row["seconds"] for row in rows) for rows in epochs) / len(runs)
        assert result["train_seconds"] == pytest.approx(training) and 0 < training < with_validation
        assert result["input_bytes"] == 3 * (32 // result["ratio"]) ** 2
    assert all(r["gflops"] < results[1]["gflops"] / 2 for r in results[2:])  # the assistant's net, 16x fewer pixels
    table = (tmp_path / "quality-quick-ratio4.md").read_text().splitlines()
    assert len(table) == 2 + len(results) and "beats LR baseline?" in table[0]
    assert (tmp_path / "quality-quick-ratio4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

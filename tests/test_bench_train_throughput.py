"""bench/train_throughput.py at CPU sizes: both variants train, and the results name what was measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput  # noqa: E402


def test_both_variants_train_and_the_results_are_written(tmp_path, capsys):
    assert train_throughput.main(["--device", "cpu", "--hr-size", "32", "--teacher", "resnet18", "--batch-size",
                                  "4", "--steps", "2", "--num-workers", "0", "--work", str(tmp_path / "work"),
                                  "--results", str(tmp_path / "results")]) == 0
    result = json.loads((tmp_path / "results" / "train-throughput-cpu.json").read_text())
    assert result["setup"] == {"hr_size": 32, "ratio": 4, "teacher": "resnet18", "student": "resnet18",
                               "batch_size": 4, "steps": 2, "num_workers": 0, "method": "kd+isrd"}
    rates = result["images_per_second"]
    assert set(rates) == {"project", "official_style"} and all(rate > 0 for rate in rates.values())
    table = (tmp_path / "results" / "train-throughput-cpu.md").read_text()
    assert "| official_style |" in table and "1.00x" in table and table in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/gpu.sh would run")
def test_the_gpu_check_refuses_a_machine_without_cuda():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.strip() == "bench/gpu.sh: no CUDA device is visible to torch here; run it on a GPU machine"

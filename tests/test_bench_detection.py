"""bench/detection.py writes every model's COCO mAP and cost in the documented form."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


@pytest.mark.slow
@pytest.mark.requires(COCO128.is_dir(), f"{COCO128} is not here (the shared test data)")
def test_the_quick_detection_benchmark_reports_every_model(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_detection", ROOT / "bench" / "detection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--image-size", "64", "--ratios", "2", "--out", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "results")]) == 0
    result = json.loads((tmp_path / "results" / "detection-quick.json").read_text())
    models = {(m["name"], m["ratio"]): m for m in result["models"]}
    assert set(models) == {("teacher", 1), ("lr_baseline", 2), ("assistant", 2), ("student_afp", 2),
                           ("msad_teacher", 2), ("student_msad", 2)}
    for model in result["models"]:
        assert {"name", "method", "ratio", "input_size", "AP", "AP50", "AP75", "gflops", "input_bytes"} <= set(model)
        # COCO's AP averages AP50 .. AP95, and a stricter IoU never finds more: AP75 <= AP <= AP50
        assert 0 <= model["AP75"] <= model["AP"] <= model["AP50"] <= 1 and model["gflops"] > 0
        assert model["input_bytes"] == 3 * model["input_size"] ** 2
    assert models["student_afp", 2]["input_size"] == models["assistant", 2]["input_size"] // 2 == 32
    assert models["student_afp", 2]["gflops"] < models["assistant", 2]["gflops"]  # one network, a quarter of the pixels
    assert (models["student_afp", 2]["method"], models["student_msad", 2]["method"]) == ("afp", "msad")
    assert (tmp_path / "results" / "detection-quick.png").read_bytes().startswith(b"\x89PNG")

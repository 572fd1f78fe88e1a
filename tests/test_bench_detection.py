"""bench/detection.py writes every model's COCO mAP and cost in the documented form."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quick_detection_benchmark_reports_every_model(tmp_path):
    """The benchmark's contract on a small generated COCO set (coco128 itself runs through the
    detection pipeline in test_detection_stages.py)."""
    from conftest import write_coco

    spec = importlib.util.spec_from_file_location("bench_detection", ROOT / "bench" / "detection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    annotations, images = write_coco(tmp_path / "coco", images=24, size=64)
    assert bench.main(["--coco", "--quick", "--annotations", str(annotations), "--images", str(images), "--image-size", "64",
                       "--ratios", "2", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 0
    result = json.loads((tmp_path / "results" / "detection-quick.json").read_text())["coco128"]
    models = {(m["name"], m["ratio"]): m for m in result["models"]}
    assert set(models) == {("teacher", 1), ("lr_baseline", 2), ("assistant", 2), ("student_afp", 2),
                           ("msad_teacher", 2), ("student_msad", 2)}
    for model in result["models"]:
        assert {"name", "method", "ratio", "input_size", "AP", "AP50", "AP75", "gflops", "input_bytes"} <= set(model)
        # a stricter IoU never finds more (AP75 <= AP50), and AP averages AP50 .. AP95 (AP <= AP50); AP75
        # may lie above that average
        assert 0 <= model["AP75"] <= model["AP50"] <= 1 and 0 <= model["AP"] <= model["AP50"] and model["gflops"] > 0
        assert model["input_bytes"] == 3 * model["input_size"] ** 2
    assert models["student_afp", 2]["input_size"] == models["assistant", 2]["input_size"] // 2 == 32
    assert models["student_afp", 2]["gflops"] < models["assistant", 2]["gflops"]  # one network, a quarter of the pixels
    assert (models["student_afp", 2]["method"], models["student_msad", 2]["method"]) == ("afp", "msad")
    assert (tmp_path / "results" / "detection-quick.png").read_bytes().startswith(b"\x89PNG")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_detection", ROOT / "bench" / "detection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run(seed, teacher, afp, msad, baseline):
    return {"seed": seed, "AP": {"teacher": teacher, "assistant": teacher, "student_afp": afp,
                                 "msad_teacher": teacher, "student_msad": msad, "lr_baseline": baseline}}


def test_the_generated_benchmark_names_each_promise_it_misses():
    bench = load_bench()
    assert bench.misses([run(0, 40.0, 30.0, 31.0, 29.0), run(1, 35.0, 29.0, 30.0, 29.5)]) == []
    assert bench.misses([run(0, 40.0, 30.0, 31.0, 29.0), run(1, 29.9, 29.0, 27.0, 29.5)]) == [
        "seed 1: the teacher's AP 29.90 is under 30",
        "student_msad: mean AP 29.00 is not above the LR baseline's 29.25"]


def test_a_run_of_one_benchmark_keeps_the_other_s_results(tmp_path):
    bench = load_bench()
    path = tmp_path / "detection.json"
    bench.update_results(path, "coco128", {"models": [1]})
    bench.update_results(path, "generated", {"runs": [2]})
    bench.update_results(path, "coco128", {"models": [3]})
    assert json.loads(path.read_text()) == {"coco128": {"models": [3]}, "generated": {"runs": [2]}}

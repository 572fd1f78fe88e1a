"""The detection stages: detector (teacher, LR baseline), afp (AFP and MSAD), evaluate, and the pipeline."""

import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from components import detection_distill, detector, evaluate, prepare_data
from kd_lib.config import ConfigError, from_dict
from kd_lib.data.detection_shards import DetectionShardDataset
from kd_lib.data.imagefolder import DataError
from kd_lib.distill.detection import AFPDistiller
from kd_lib.engine.loop import TrainingInterrupted
from kd_lib.eval.detection import detector_validation
from kd_lib.io.manifest import IncompleteOutputError, read_manifest, read_published
from kd_lib.models.detector_store import load_detector

COCO128 = Path(__file__).parents[1].parent / "shared/data/coco128"
TINY = {"epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu", "seed": 0}
#: The teacher trains long enough to learn to detect, its lr warming up over the default 50 steps.
TEACHER = {"epochs": 4}


def run_detector(data, out, **fields):
    return detector.run(from_dict(detector.DetectorConfig, {**TINY, "data": data, "out": str(out), **fields}))


def run_afp(data, out, teacher, **fields):
    return detection_distill.run(from_dict(detection_distill.DetectionDistillConfig, {
        **TINY, "data": data, "out": str(out), "teacher": teacher, "msad_ramp_iters": 2, **fields}))


@pytest.fixture(scope="module")
def teacher(prepared_detection, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_detector(prepared_detection, out, **TEACHER)
    return str(out)


def test_the_teacher_is_published_and_a_rerun_is_a_no_op(prepared_detection, teacher, capsys):
    manifest = read_manifest(teacher)
    model, spec, meta = load_detector(teacher)
    assert (spec.kind, spec.backbone, spec.image_size, spec.first_level) == ("fcos", "resnet18", 128, 3)
    assert meta["classes"] == ["red", "blue"] and set(manifest["files"]) == {"model.pt", "metrics.parquet"}
    assert 0 <= manifest["final"]["val_AP"] <= 1
    assert run_detector(prepared_detection, teacher, **TEACHER)["key"] == manifest["key"]
    assert "up to date" in capsys.readouterr().err
    assert run_detector(prepared_detection, teacher, ratio=4, **TEACHER)["key"] == manifest["key"]  # HR ignores the ratio


def test_the_teacher_learns_to_detect(prepared_detection, teacher):
    """Its training loss falls, and its AP ends above that of the same detector untrained."""
    manifest = read_manifest(teacher)
    rows = pq.read_table(Path(teacher) / manifest["paths"]["metrics.parquet"]).to_pylist()
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
    _, spec, _ = load_detector(teacher)
    torch.manual_seed(0)
    val = DetectionShardDataset(prepared_detection, "val", 1, train=False)
    untrained = detector_validation(val, "hr")(spec.build(), torch.device("cpu"))["AP"]
    assert rows[-1]["val_AP"] > untrained + 0.01, (rows[-1]["val_AP"], untrained)


@pytest.mark.parametrize("method, ratio, backbone", [("afp", 2, "resnet18"), ("afp", 4, "resnet18"),
                                                     ("msad", 2, "resnet18"), ("msad", 4, "resnet18"),
                                                     ("afp", 2, "mobilenet_v3_large")])
def test_afp_publishes_an_aligned_assistant_and_student(prepared_detection, teacher, tmp_path, method, ratio,
                                                        backbone):
    manifest = run_afp(prepared_detection, tmp_path / "out", teacher, method=method, ratio=ratio, backbone=backbone)
    hr = "assistant" if method == "afp" else "teacher"
    assistant, a_spec, _ = load_detector(str(tmp_path / "out" / hr))
    student, s_spec, meta = load_detector(str(tmp_path / "out" / "student"))
    shift = {2: 1, 4: 2}[ratio]
    low = 3 if method == "afp" else 2
    assert (a_spec.image_size, a_spec.first_level) == (128, low + shift)
    assert (s_spec.image_size, s_spec.first_level, s_spec.lowest_level) == (128 // ratio, low, low)
    assert assistant.state_dict().keys() == student.state_dict().keys()  # one architecture, two windows
    assert meta["info"]["method"] == method
    stages = (read_manifest(str(tmp_path / "out" / part))["stage"] for part in (hr, "student"))
    assert tuple(stages) == (f"{method}-{hr}", f"{method}-student")
    assistant_kd = [k for k in manifest["final"] if k.startswith(f"{hr}_") and "afp_" in k]
    assert bool(assistant_kd) == (method == "afp")  # the MSAD teacher: its own losses only, by default
    assert {f"{hr}/model.pt", "student/model.pt"} <= set(manifest["files"])
    assert not (tmp_path / "out" / "checkpoints").exists()
    with torch.no_grad():  # the published student detects on LR images
        found = student([torch.rand(3, 128 // ratio, 128 // ratio)])[0]
    assert set(found) == {"boxes", "scores", "labels"}


class KillInStudentPhase(AFPDistiller):
    """Sends itself SIGTERM at the 3rd training step of the LR student."""

    calls = 0

    def forward(self, hr, lr, targets):
        if self.view == "lr" and self.training:
            type(self).calls += 1
            if type(self).calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(hr, lr, targets)


def test_an_interrupted_afp_run_resumes_in_the_student_phase(prepared_detection, teacher, tmp_path, monkeypatch,
                                                             capsys):
    fields = {"epochs": 2, "checkpoint_root": str(tmp_path / "ckpt")}
    straight = run_afp(prepared_detection, tmp_path / "straight", teacher, **fields)
    monkeypatch.setattr(detection_distill, "AFPDistiller", KillInStudentPhase)
    with pytest.raises(TrainingInterrupted):
        run_afp(prepared_detection, tmp_path / "resumed", teacher, **fields)
    with pytest.raises(IncompleteOutputError):
        read_manifest(str(tmp_path / "resumed"))  # nothing published
    [last] = (tmp_path / "ckpt").glob("detection-distill-*/student-train/last.pt")
    assert torch.load(last, weights_only=True)["loop"]["step"] == 3
    capsys.readouterr()
    run_afp(prepared_detection, tmp_path / "resumed", teacher, **fields)
    err = capsys.readouterr().err
    assert "afp phase 1 already done" in err
    assert f"afp student: resumed from {last} at epoch 1, batch 3" in err
    assert KillInStudentPhase.calls == straight["final"]["student_step"]  # 3, then the rest: not from the start
    for part in ("assistant", "student"):
        straight_model, _, _ = load_detector(str(tmp_path / "straight" / part))
        resumed_model, _, _ = load_detector(str(tmp_path / "resumed" / part))
        torch.testing.assert_close(resumed_model.state_dict(), straight_model.state_dict(), rtol=0, atol=0,
                                   msg=lambda message, part=part: f"{part}: {message}")


def test_prepare_data_reads_yolo_labels(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 1)):
        (tmp_path / "yolo" / "images" / split).mkdir(parents=True)
        (tmp_path / "yolo" / "labels" / split).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (80, 40), (90, 90, 90)).save(tmp_path / "yolo" / "images" / split / f"{i}.jpg")
            (tmp_path / "yolo" / "labels" / split / f"{i}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "yolo" / "data.yaml").write_text("names: [cat, dog]\n")
    manifest = prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
        "source": str(tmp_path / "yolo"), "out": str(tmp_path / "data"), "image_size": 64}))
    assert (manifest["task"], manifest["classes"], manifest["image_size"]) == ("detection", ["cat", "dog"], 64)
    assert {s: (v["images"], v["boxes"]) for s, v in manifest["splits"].items()} == {"train": (3, 3), "val": (1, 1)}
    target = DetectionShardDataset(str(tmp_path / "data"), "val")[0][1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[16.0, 8.0, 48.0, 24.0]]))  # 80x40 -> 64x32
    assert target["labels"].tolist() == [1]


def test_bad_detection_inputs_are_named(prepared_detection, prepared, teacher, tmp_path):
    with pytest.raises(ConfigError, match="kind.*the teacher is a fcos and the student a retinanet"):
        run_afp(prepared_detection, tmp_path / "a", teacher, kind="retinanet")
    with pytest.raises(DataError, match="classification data"):
        run_detector(prepared, tmp_path / "b")
    with pytest.raises(DataError, match="LR side of 16 px; it must be a multiple of 32"):
        run_detector(prepared_detection, tmp_path / "c", ratio=8, view="lr")
    with pytest.raises(IncompleteOutputError):
        run_afp(prepared_detection, tmp_path / "d", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="ratio"):
        run_afp(prepared_detection, tmp_path / "e", teacher, ratio=1)
    manifest = read_manifest(prepared_detection)
    reds = str(tmp_path / "reds")
    prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
        "source": manifest["source"], "images": str(Path(manifest["source"]).parent / "images"), "out": reds,
        "image_size": 128, "val_fraction": 0.25, "categories": ["red"]}))
    with pytest.raises(DataError, match="teacher at .* detects 2 classes, but the data has 1"):
        run_afp(reds, tmp_path / "f", teacher)
    assert not any((tmp_path / name / "manifest.json").exists() for name in "abcdef")


def test_evaluate_scores_detectors_by_coco_map_against_hr_boxes(prepared_detection, teacher, tmp_path):
    baseline = tmp_path / "baseline"
    run_detector(prepared_detection, baseline, view="lr", ratio=4)
    summary = evaluate.run(from_dict(evaluate.EvaluateConfig, {
        "data": prepared_detection, "out": str(tmp_path / "eval"), "device": "cpu", "num_workers": 0,
        "models": {"teacher": teacher, "lr_baseline": str(baseline)}, "latency_repeats": 1,
        "latency_batch_sizes": [1]}))
    assert summary["task"] == "detection" and summary["hr_size"] == 128 and summary["ratio"] == "4"
    teacher_row, baseline_row = summary["models"]
    assert (teacher_row["view"], teacher_row["ratio"], baseline_row["view"], baseline_row["ratio"]) == ("hr", 1, "lr", 4)
    assert teacher_row["input_bytes"] == 16 * baseline_row["input_bytes"]
    assert teacher_row["gflops"] > 4 * baseline_row["gflops"]
    for row in summary["models"]:
        assert all(row[k] is None or 0 <= row[k] <= 1 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert json.loads(read_published(str(tmp_path / "eval"), "summary.json")) == summary
    assert "AP50" in read_published(str(tmp_path / "eval"), "report.html").decode()
    assert read_published(str(tmp_path / "eval"), "report.png").startswith(b"\x89PNG\r\n\x1a\n")  # its AP plot


@pytest.mark.slow
@pytest.mark.requires(COCO128.is_dir(), f"{COCO128} is not here (the shared test data)")
def test_the_detection_pipeline_runs_end_to_end_on_coco128(tmp_path):
    from pipelines.cli import main

    out = tmp_path / "run"
    assert main(["detect", "--data", str(COCO128 / "annotations" / "instances_train2017.json"), "--images",
                 str(COCO128 / "train2017"), "--image-size", "64", "--ratio", "2", "--epochs", "1",
                 "--set", "teacher.batch_size=8", "--set", "evaluate.latency_repeats=1",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["teacher", "assistant", "student_afp", "msad_teacher", "student_msad", "lr_baseline"]
    assert summary["dataset"]["train_images"] + summary["dataset"]["val_images"] == 128
    sizes = {m["name"]: m["input_size"] for m in summary["models"]}
    assert sizes == {"teacher": 64, "assistant": 64, "msad_teacher": 64, "student_afp": 32, "student_msad": 32,
                     "lr_baseline": 32}
    assert all(0 <= m["AP"] <= 1 for m in summary["models"])
    assert (out / "report.html").stat().st_size > 10_000


def test_kdp_detect_checks_every_stage_setting_before_running(tmp_path, capsys):
    from pipelines.cli import main

    args = ["detect", "--data", str(tmp_path / "instances.json"), "--images", str(tmp_path), "--out",
            str(tmp_path / "run")]
    assert main([*args, "--set", "msad.msad_alpah=0.5"]) == 2
    assert "msad_alpah" in capsys.readouterr().err
    assert main([*args, "--set", "afp.afp_temperature=0"]) == 2
    assert "afp_temperature" in capsys.readouterr().err
    assert main([*args, "--set", "nope.epochs=1"]) == 2
    err = capsys.readouterr().err
    named = err.split("TASK one of ")[1].split(" (or a stage's name")[0].split(", ")
    assert set(named) == {"prepare-data", "teacher", "afp", "msad", "lr-baseline", "export", "evaluate"}
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_kdp_detect_without_data_runs_the_generated_demo_with_its_settings(tmp_path, monkeypatch):
    from pipelines import cli

    monkeypatch.setattr(cli, "DETECTION_DEMO_DATA", {**cli.DETECTION_DEMO_DATA, "train_images": 16,
                                                      "val_images": 8})
    out = tmp_path / "run"
    assert cli.main(["detect", "--epochs", "1", "--set", "evaluate.latency_repeats=1", "--out", str(out)]) == 0
    assert json.loads((out / "demo-data" / "detection_demo.json").read_text())["images"] == {"train": 16, "val": 8}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["num_classes"] == 4
    assert summary["dataset"]["train_images"] + summary["dataset"]["val_images"] == 24
    models = {m["name"]: m for m in summary["models"]}
    assert {name: m["input_size"] for name, m in models.items()} == {
        "teacher": 128, "assistant": 128, "student_afp": 64, "msad_teacher": 128, "student_msad": 64,
        "lr_baseline": 64}
    assert models["teacher"]["arch"] == "fcos resnet18"  # the demo's teacher backbone, not the default ResNet-34
    # the demo's 128-channel pyramid and head: 13.2 M parameters, where torchvision's 256 channels give 19.3 M
    assert 13e6 < models["teacher"]["params"] < 14e6


def test_kdp_detect_without_data_takes_no_images_folder(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["detect", "--images", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "--images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

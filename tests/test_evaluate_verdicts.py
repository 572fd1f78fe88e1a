"""The evaluate stage on tiny trained models: how each was trained, its verdicts, the device."""

import io
import json

import pytest
from PIL import Image

from components import evaluate, lr_baseline, student, teacher
from kd_lib.config import from_dict
from kd_lib.io.manifest import read_published

pytestmark = pytest.mark.slow  # trains three models

TINY = {"epochs": 2, "batch_size": 8, "hr_size": 32, "ratio": 4, "num_workers": 0, "arch": "resnet18"}


def train(cls, run, data, out, **fields):
    run(from_dict(cls, {**TINY, "data": data, "out": str(out), **fields}))
    return str(out)


def test_summary_says_how_each_model_was_trained_and_gives_verdicts(prepared, tmp_path, capsys):
    models = {"teacher": train(teacher.TeacherConfig, teacher.run, prepared, tmp_path / "t", lr=0.05),
              "lr_baseline": train(lr_baseline.LRBaselineConfig, lr_baseline.run, prepared, tmp_path / "b",
                                   epochs=1)}
    models["student"] = train(student.StudentConfig, student.run, prepared, tmp_path / "s", method="kd",
                              teacher=models["teacher"], epochs=1, temperature=2.0)
    gate = {"passed": True, "message": "gate off"}
    summary = evaluate.run(from_dict(evaluate.EvaluateConfig, {
        "data": prepared, "out": str(tmp_path / "eval"), "hr_size": 32, "ratio": 4, "latency_repeats": 1,
        "num_workers": 0, "models": models, "gate": gate, "code_version": "abc123"}))
    printed = capsys.readouterr().out
    by_name = {m["name"]: m for m in summary["models"]}
    assert {n: (m["stage"], m["method"], m["distilled_from"]) for n, m in by_name.items()} == {
        "teacher": ("teacher", "ce", None), "lr_baseline": ("lr-baseline", "ce", None),
        "student": ("student", "kd", "teacher")}
    # settings against the stage's own defaults: the wiring (data, arch, sizes...) is left out
    assert by_name["student"]["settings"] == {"method": "kd", "temperature": 2.0, "epochs": 1, "batch_size": 8}
    assert by_name["teacher"]["settings"] == {"epochs": 2, "batch_size": 8}  # lr 0.05: the stage's own
    assert [row["epoch"] for row in by_name["teacher"]["history"]] == [1, 2]
    assert {"train_loss", "train_ce", "train_kd", "val_top1", "lr"} <= set(by_name["student"]["history"][0])
    assert [(v["model"], v["reference"]) for v in summary["verdicts"]] == [
        ("teacher", "lr_baseline"), ("student", "lr_baseline"), ("student", "teacher")]
    assert summary["gate"] == gate and summary["code_version"] == "abc123"
    assert summary["device"].startswith("cpu (") and "threads)" in summary["device"]
    for verdict in summary["verdicts"]:
        assert verdict["text"] in printed
    assert json.loads(read_published(str(tmp_path / "eval"), "summary.json")) == summary
    report = read_published(str(tmp_path / "eval"), "report.html").decode()
    assert summary["verdicts"][0]["text"].replace("%", "%") in report
    plot = Image.open(io.BytesIO(read_published(str(tmp_path / "eval"), "report.png", check_hash=True)))
    assert plot.format == "PNG" and plot.width > 400

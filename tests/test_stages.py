"""Training stages on a tiny prepared dataset: no-op reruns, and failures that publish nothing (resume:
test_resume.py)."""

import pyarrow.parquet as pq
import pytest
import torch

from components import assistant, common, evaluate, student, teacher
from kd_lib.config import from_dict
from kd_lib.data.imagefolder import DataError
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform
from kd_lib.distill.distiller import Distiller
from kd_lib.engine.loop import NonFiniteLossError, fit
from kd_lib.eval.accuracy import classifier_validation
from kd_lib.io.manifest import IncompleteOutputError, read_manifest
from kd_lib.models import build_classifier

TINY = {"epochs": 2, "batch_size": 8, "hr_size": 32, "ratio": 4, "num_workers": 0, "lr": 0.05}
#: Validation top-1 of a model that learned: the prepared data has 3 classes, chance is a third.
LEARNED = 0.5


def config(cls, data, out, **fields):
    return from_dict(cls, {**TINY, "data": data, "out": str(out), **fields})


def datasets(data):
    return [ShardedImageDataset(data, split, CropTransform(32, 4, train=split == "train"))
            for split in ("train", "val")]


def test_teacher_stage_publishes_then_is_a_no_op(prepared, tmp_path, capsys):
    out = tmp_path / "teacher"
    manifest = teacher.run(config(teacher.TeacherConfig, prepared, out, arch="resnet18"))
    assert sorted(manifest["files"]) == ["metrics.parquet", "model.pt"]
    assert manifest["final"]["epoch"] == 2 and not (out / "checkpoints").exists()
    rows = pq.read_table(out / manifest["paths"]["metrics.parquet"]).to_pylist()
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"], "the teacher's training loss did not fall"
    assert rows[-1]["val_top1"] >= LEARNED, f"the teacher ends at {rows[-1]['val_top1']:.2f} top-1"
    model = out / manifest["paths"]["model.pt"]
    stamp = model.stat().st_mtime_ns
    assert teacher.run(config(teacher.TeacherConfig, prepared, out, arch="resnet18")) == manifest
    assert "up to date" in capsys.readouterr().err
    assert model.stat().st_mtime_ns == stamp
    changed = teacher.run(config(teacher.TeacherConfig, prepared, out, arch="resnet18", lr=0.02))
    assert changed["key"] != manifest["key"]


@pytest.fixture(scope="module")
def trained_teacher(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    teacher.run(config(teacher.TeacherConfig, prepared, out, arch="resnet18"))
    return str(out)


def test_students_of_both_methods_train_from_upstream_outputs(prepared, trained_teacher, tmp_path):
    a = assistant.run(config(assistant.AssistantConfig, prepared, tmp_path / "a", teacher=trained_teacher,
                             epochs=1))
    s = student.run(config(student.StudentConfig, prepared, tmp_path / "s", assistant=str(tmp_path / "a"),
                           epochs=1, isrd_weight=5.0))
    o = student.run(config(student.StudentConfig, prepared, tmp_path / "o", method="kd+isrd",
                           teacher=trained_teacher, isrd_weight=1.0, lr=0.01))
    assert {"train_ce", "train_kd", "train_feature", "train_isrd"} <= set(s["final"])
    assert {"train_ce", "train_kd", "train_isrd"} <= set(o["final"]) and "train_feature" not in o["final"]
    assert a["stage"] == "assistant" and o["stage"] == "student"
    summary = evaluate.run(from_dict(evaluate.EvaluateConfig, {
        "data": prepared, "out": str(tmp_path / "eval"), "hr_size": 32, "ratio": 4, "latency_repeats": 1,
        "models": {"teacher": trained_teacher, "student": str(tmp_path / "s")}}))
    assert [(m["name"], m["input_size"], m["input_bytes"]) for m in summary["models"]] == [
        ("teacher", 32, 3 * 32 * 32), ("student", 8, 3 * 8 * 8)]
    assert summary["models"][0]["top1"] >= LEARNED and o["final"]["val_top1"] >= LEARNED, \
        "the teacher and the student distilled from it must end well above chance"
    assert read_manifest(str(tmp_path / "eval"))["stage"] == "evaluate"


def test_tas_student_must_keep_the_assistants_architecture(prepared, trained_teacher, tmp_path):
    with pytest.raises(Exception, match="starts from the assistant.s weights, so it has the assistant.s architecture"):
        student.run(config(student.StudentConfig, prepared, tmp_path / "s", assistant=trained_teacher,
                           arch="mobilenet_v3_small"))
    assert not (tmp_path / "s").exists()


def test_tas_student_starts_from_the_assistant_unless_told_not_to():
    assistant_model = build_classifier("resnet18", 3)
    models = {"assistant": (assistant_model, {"arch": "resnet18", "info": {"started_from": "random"}})}
    same = []
    for start in (True, False):
        settings = from_dict(student.StudentConfig, {**TINY, "data": "d", "out": "o", "arch": "resnet18",
                                                     "assistant": "a", "start_from_assistant": start})
        planned = student.plan(settings, ["a", "b", "c"], models)
        assert planned.task.teacher is assistant_model  # distilled from the assistant either way
        same.append(all(torch.equal(p, q) for p, q in zip(planned.task.student.state_dict().values(),
                                                          assistant_model.state_dict().values())))
        assert planned.started_from == ("assistant (random)" if start else "random")
    assert same == [True, False]
    with pytest.raises(Exception, match="start_from_assistant: false"):
        from_dict(student.StudentConfig, {**TINY, "data": "d", "out": "o", "assistant": "a", "weights": "w.pt"})
    from_dict(student.StudentConfig, {**TINY, "data": "d", "out": "o", "assistant": "a", "weights": "w.pt",
                                      "start_from_assistant": False})


def test_missing_upstream_output_is_named(prepared, tmp_path):
    missing = tmp_path / "no-teacher"
    with pytest.raises(IncompleteOutputError, match=f"teacher: {missing} does not exist"):
        assistant.run(config(assistant.AssistantConfig, prepared, tmp_path / "a", teacher=str(missing)))


def test_wrong_class_count_is_an_error(prepared, trained_teacher, tmp_path, make_imagefolder):
    from kd_lib.data.shards import prepare_imagefolder

    other = str(tmp_path / "four")
    prepare_imagefolder(str(make_imagefolder(tmp_path / "src4", classes=4, train=4, val=2)), other)
    with pytest.raises(DataError, match=r"teacher at .* trained on classes \[class0, class1, class2\], the data "
                                        r"has \[class0, class1, class2, class3\]"):
        assistant.run(config(assistant.AssistantConfig, other, tmp_path / "a", teacher=trained_teacher))


class NaNAfter(Distiller):
    def forward(self, hr, lr, labels):
        loss, terms = super().forward(hr, lr, labels)
        return loss * float("nan"), terms


def test_nan_loss_stops_the_stage_and_publishes_nothing(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "Distiller", NaNAfter)
    out = tmp_path / "teacher"
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, batch 0"):
        teacher.run(config(teacher.TeacherConfig, prepared, out, arch="resnet18"))
    assert not (out / "manifest.json").exists() and not list(out.glob("v-*"))
    assert common.stage_cli(teacher.TeacherConfig, teacher.run,
                            ["--data", prepared, "--out", str(out), "--arch", "resnet18", "--epochs", "1",
                             "--batch-size", "8", "--hr-size", "32", "--num-workers", "0"],
                            "teacher", "") == 1


def test_cli_rejects_unknown_fields(capsys):
    assert common.stage_cli(teacher.TeacherConfig, teacher.run, ["--data", "d", "--out", "o", "--ratio", "3"],
                            "teacher", "") == 2
    assert "'hr_size': 64 is not divisible by ratio 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.stage_cli(teacher.TeacherConfig, teacher.run, ["--epoch", "3"], "teacher", "")


def test_gradient_clipping_bounds_each_update(prepared, tmp_path):
    def trained(clip):
        torch.manual_seed(0)
        task = Distiller(build_classifier("resnet18", 3), "hr")
        before = [p.detach().clone() for p in task.student.parameters()]
        settings = from_dict(teacher.TeacherConfig, {**TINY, "data": prepared, "out": "x", "epochs": 1,
                                                     "weight_decay": 0.0, "grad_clip_norm": clip})
        train, val = datasets(prepared)
        fit(task, train, settings, str(tmp_path / f"clip{clip}"), classifier_validation(val, "hr"))
        return max((p - b).abs().max().item() for p, b in zip(task.student.parameters(), before))

    assert trained(1e-9) < 1e-7 < trained(0.0)

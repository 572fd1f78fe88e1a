"""The KFP pipeline end to end with kfp.local on a tiny generated dataset, and its cache."""

import json

import pytest

from kd_lib.io.manifest import read_published
from pipelines import cli

pytestmark = pytest.mark.slow

TINY_STAGE = "epochs=1,batch_size=8,num_workers=0"


def run_kdp(data, out, *flags):
    argv = ["run", "--data", str(data), "--out", str(out), "--hr-size", "32", "--ratio", "4",
            "--teacher-arch", "resnet18", "--student-arch", "resnet18", *flags]
    for stage in ("teacher", "assistant", "student", "student-onestage", "lr-baseline"):
        argv += [f"--set={stage}.{kv}" for kv in TINY_STAGE.split(",")]
    argv += ["--set=evaluate.latency_repeats=1", "--set=evaluate.num_workers=0",
             "--set=export.calibration_images=8", "--set=export.latency_repeats=1"]
    return cli.main(argv)


def executed_tasks(pipeline_root):
    return sorted(p.parent.name for p in pipeline_root.glob("*/*/executor_output.json"))


def test_local_pipeline_gates_runs_end_to_end_and_caches(tmp_path, capsys, monkeypatch):
    """One sequence of runs on the same data and out: the gate skips the students, then lets them
    run; a rerun retrains nothing; ``rerun_student`` reruns the student and what reads it; new data
    reruns everything from prepare-data down."""
    from kd_lib.data.demo import generate_demo_dataset
    from pipelines import local

    data = tmp_path / "demo"
    generate_demo_dataset(str(data), seed=1, num_classes=4, train_per_class=12, val_per_class=4, size=32)
    out = tmp_path / "run"

    assert run_kdp(data, out, "--min-teacher-margin", "101") == 0  # no teacher beats anything by 101 points
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["teacher", "lr_baseline"]
    assert not summary["gate"]["passed"] and summary["gate"]["min_teacher_margin"] == 101
    assert f"gate: {summary['gate']['message']}" in printed and "students are skipped" in printed
    assert [v["text"] for v in summary["verdicts"]] == [summary["verdicts"][0]["text"]]
    assert summary["verdicts"][0]["text"] in printed
    gated = executed_tasks(out / "pipeline_root")
    assert gated == sorted(["source-version", "prepare-data", "teacher", "lr-baseline", "teacher-gate",
                            "evaluate-ungated"])

    assert run_kdp(data, out, "--min-teacher-margin", "-99") == 0  # met unless 0 % against 100 %
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gate"]["passed"]
    assert f"summary: {out / 'summary.json'}" in printed and f"report:  {out / 'report.html'}" in printed
    assert "Got executor_input" not in printed
    assert summary["hr_size"] == 32 and summary["ratio"] == 4
    assert summary["dataset"]["num_classes"] == 4 and summary["dataset"]["train_images"] == 48
    assert summary["dataset"]["val_images"] == 16 and len(summary["dataset"]["fingerprint"]) == 64
    models = {m["name"]: m for m in summary["models"]}
    assert list(models) == ["teacher", "assistant", "student", "student_onestage", "lr_baseline"]
    for name, model in models.items():
        lr = name not in ("teacher", "assistant")
        assert model["input_size"] == (8 if lr else 32) and model["input_bytes"] == 3 * model["input_size"] ** 2
        assert 0 <= model["top1"] <= model["top5"] <= 1 and model["gflops"] > 0 and model["params"] > 0
        assert model["latency_ms"]["batch_1"] > 0 and model["latency_ms"]["batch_64"] > 0
    assert "<table" in (out / "report.html").read_text()
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    # the TAS student is exported, checked in onnxruntime, and the table says so
    export = models["student"]["export"]
    assert export["max_rel_diff"] <= 1e-3 and export["int8_bytes"] < export["onnx_bytes"]
    assert "onnx agree %" in printed and all(m["started_from"] == "random" for n, m in models.items()
                                              if n != "student")
    assert models["student"]["started_from"] == "assistant (random)"
    [exported] = (out / "pipeline_root").glob("*/export/model")
    assert set(json.loads((exported / "manifest.json").read_text())["files"]) == set(local.MODEL_FILES)
    # and copied whole to the run's stable model folder, whose paths the run prints
    assert f"model:   {out / 'model' / 'model.onnx'}, " in printed
    for name in local.MODEL_FILES:
        assert (out / "model" / name).read_bytes() == read_published(str(exported), name)
    # the teacher and the LR baseline come from the cache; the gate decides again and the rest runs
    passed = executed_tasks(out / "pipeline_root")
    assert passed == sorted([*gated, "source-version", "teacher-gate", "assistant", "student", "student-onestage",
                             "export", "evaluate"])

    assert run_kdp(data, out, "--min-teacher-margin", "-99") == 0  # only the listing of the unchanged data runs
    assert executed_tasks(out / "pipeline_root") == sorted([*passed, "source-version"]), \
        "the same run again retrained something"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in out.glob("model*")) == ["model", (out / "model").resolve().name]  # the older copy went

    run_pipeline = local.run_pipeline
    monkeypatch.setattr(local, "run_pipeline",
                        lambda params, out, pipeline, runner="subprocess":
                        run_pipeline({**params, "rerun_student": "1"}, out, pipeline, runner))
    assert run_kdp(data, out, "--min-teacher-margin", "-99") == 0  # the student and what reads it run again
    monkeypatch.setattr(local, "run_pipeline", run_pipeline)
    again = sorted([*passed, "source-version", "source-version", "student", "export", "evaluate"])
    assert executed_tasks(out / "pipeline_root") == again

    (data / "train" / sorted(p.name for p in (data / "train").iterdir())[0] / "extra.png").write_bytes(
        next((data / "val").rglob("*.png")).read_bytes())  # one more training image: new data
    assert run_kdp(data, out, "--min-teacher-margin", "101") == 0
    assert executed_tasks(out / "pipeline_root") == sorted([*again, *gated]), \
        "new data: every task from prepare-data down must run again"


def test_a_failed_task_puts_its_error_line_on_stderr_without_colour(tmp_path, capsys, make_imagefolder):
    """kdp run on a dataset with a damaged image: stderr names the task and the file, in one line."""
    data = make_imagefolder(tmp_path / "data", train=4, val=2)
    damaged = data / "train" / "class0" / "000.png"
    damaged.write_bytes(b"not a png")
    capsys.readouterr()
    assert run_kdp(data, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "task 'prepare-data' failed" in err and str(damaged) in err and "\x1b" not in err, err
    assert len(err.strip().splitlines()) == 1, err

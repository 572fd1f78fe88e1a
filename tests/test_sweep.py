"""kdp sweep: the grid as a pipeline through kfp.local, its answer, its cache, and its refusals."""

import json
import re

import pytest
import yaml
from kfp import compiler

from pipelines import cli
from pipelines.sweep import sweep_pipeline

TINY = ["--hr-size", "32", "--student-archs", "resnet18", "--epochs", "1", "--set", "evaluate.latency_repeats=1",
        *(word for stage in ("teacher", "assistant", "student", "lr-baseline")
          for word in ("--set", f"{stage}.batch_size=16"))]


def executed(out):
    return sorted(p.parent.name for p in (out / "pipeline_root").glob("*/*/executor_output.json"))


@pytest.mark.parametrize("flags, message", [
    (["--ratios", "1", "16"], r"field '--ratios': ratio 16 leaves 4 px of hr_size 64, under 8 px"),
    (["--ratios", "3"], r"field '--ratios': ratio 3 does not divide hr_size 64"),
    (["--student-archs", "resnet9000"], r"field '--student-archs': unknown torchvision architecture 'resnet9000'"),
    (["--keep", "1.5"], r"sweep \(parameter keep\): field 'keep': must be a fraction"),
    (["--max-bytes", "-1"], r"sweep \(parameter max_bytes\): field 'max_bytes'"),
    (["--set", "studnt.epochs=2"], r"field '--set': expected TASK.FIELD=VALUE"),
])
def test_impossible_settings_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert cli.main(["sweep", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_grid_is_one_task_per_cell(tmp_path):
    pipeline = sweep_pipeline((1, 2, 4), ("resnet18", "timm:resnet10t"))
    names = [task.name for task in pipeline.tasks]
    assert names[:3] == ["prepare-data", "teacher", "assistant-resnet18"]
    assert {"student-timm-resnet10t-r4", "lr-baseline-timm-resnet10t-r4", "evaluate-timm-resnet10t-r4"} < set(names)
    configs = {task.name: task.config for task in pipeline.plan({"source": "s", "lr": 0.02})}
    # each LR student trains with its baseline's schedule and lr
    for name in ("resnet18-r2", "timm-resnet10t-r4"):
        student, baseline = configs[f"student-{name}"], configs[f"lr-baseline-{name}"]
        assert (student.epochs, student.lr, student.ratio) == (baseline.epochs, baseline.lr, baseline.ratio)
        assert student.lr == 0.02 and student.method == "tas"
    assert configs["sweep"].evaluations["timm:resnet10t@4"].startswith("evaluate_timm_resnet10t_r4/")
    assert set(configs["evaluate-hr"].models) == {"teacher", "resnet18@1", "timm:resnet10t@1"}
    path = tmp_path / "sweep.yaml"
    compiler.Compiler().compile(pipeline.build(), str(path))
    spec = yaml.safe_load(path.read_text())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["keep"] == {"defaultValue": 0.9, "isOptional": True, "parameterType": "NUMBER_DOUBLE"}
    assert "rerun_student_resnet18_r2" in parameters


def test_the_checked_in_sweep_yaml_has_the_default_grid():
    spec = next(yaml.safe_load_all(open(cli.PIPELINES["sweep"][1])))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"student-resnet18-r8", "lr-baseline-timm-resnet10t-r2", "assistant-timm-resnet10t",
            "sweep"} <= set(tasks)


@pytest.mark.slow
def test_a_tiny_sweep_answers_and_a_new_ratio_trains_only_its_cells(tmp_path, capsys):
    from kd_lib.data.demo import generate_demo_dataset

    data = tmp_path / "data"
    generate_demo_dataset(str(data), seed=1, num_classes=4, train_per_class=12, val_per_class=4, size=32)
    out = tmp_path / "run"
    assert cli.main(["sweep", "--data", str(data), "--out", str(out), "--ratios", "1", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    cells = {cell["key"]: cell for cell in summary["cells"]}
    assert set(cells) == {"resnet18@1", "resnet18@2"}
    assert cells["resnet18@1"]["input_bytes"] == 3 * 32 ** 2 and cells["resnet18@2"]["input_bytes"] == 3 * 16 ** 2
    assert cells["resnet18@2"]["gain"] is not None and cells["resnet18@1"]["baseline_top1"] == []
    assert summary["reference"] in ("teacher", "resnet18@1") and summary["budget"]["keep"] == 0.9
    choice = summary["choice"]
    assert (choice["cell"] is not None) == choice["met"] and choice["message"] in printed
    if choice["met"]:  # the chosen cell's model is exported and copied to OUT/model
        assert summary["export"]["model"] == summary["model_uris"][choice["cell"]]
        assert (out / "model" / "model.onnx").stat().st_size > 0
    assert (out / "camera.png").read_bytes().startswith(b"\x89PNG") and "<img" in (out / "report.html").read_text()
    first = executed(out)

    assert cli.main(["sweep", "--data", str(data), "--out", str(out), "--ratios", "1", "2", "4", *TINY]) == 0
    new = executed(out)
    ran = sorted(name for name in set(new) if new.count(name) > first.count(name))
    assert ran == ["evaluate-resnet18-r4", "lr-baseline-resnet18-r4", "source-version", "student-resnet18-r4",
                   "sweep"]
    summary = json.loads((out / "summary.json").read_text())
    assert {cell["key"] for cell in summary["cells"]} == {"resnet18@1", "resnet18@2", "resnet18@4"}
    capsys.readouterr()

    assert cli.main(["sweep", "--choose", "--out", str(out), "--keep", "0.01"]) == 0  # no training: nothing runs
    assert executed(out) == new
    answer = capsys.readouterr().out
    assert "resnet18 at ratio 4" in answer and "export it: .venv/bin/kdp stage export --model" in answer
    assert cli.main(["sweep", "--choose", "--out", str(out), "--max-bytes", "10"]) == 0
    assert "No cell meets the budget" in capsys.readouterr().out


def test_kdp_compile_writes_the_sweep_of_a_grid(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    assert cli.main(["compile", "--pipeline", "sweep", "--ratios", "1", "4", "--student-archs", "resnet18",
                     "-o", str(path)]) == 0
    tasks = next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]
    assert {name for name in tasks if name.startswith("student-")} == {"student-resnet18-r4"}
    for flags, message in ((["--pipeline", "sweep", "--ratios", "3"], "ratio 3 does not divide hr_size 64"),
                           (["--ratios", "2"], "field '--ratios': go with --pipeline sweep")):
        assert cli.main(["compile", *flags, "-o", str(tmp_path / "other.yaml")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "other.yaml").exists()

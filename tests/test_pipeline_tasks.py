"""Stage declarations, the pipelines' DAG tables, and the stage tasks and parameters derived from them."""

import dataclasses
import re

import pytest
import yaml
from kfp import compiler

import components
from components.stage import Stage, find, stages
from kd_lib.config import ConfigError, field_default, flag_text
from pipelines import cli, detection, pixel_distillation
from pipelines.dag import Task

CLASSIFICATION, DETECTION = pixel_distillation.PIPELINE, detection.PIPELINE


def plan(pipeline, params):
    return pipeline.plan(params)


@pytest.fixture(scope="module")
def classification():
    return CLASSIFICATION


@pytest.fixture(scope="module")
def detection_pipeline():
    return DETECTION


def test_every_stage_module_declares_its_stage():
    assert set(stages()) == {"prepare-data", "teacher", "assistant", "student", "lr-baseline", "detector",
                             "detection-distill", "evaluate", "export", "sweep"}
    assert {name for name, stage in stages().items() if stage.trains} == {
        "teacher", "assistant", "student", "lr-baseline", "detector", "detection-distill"}
    for name, stage in stages().items():
        assert isinstance(stage, Stage) and find(name) is stage and find(name.replace("-", "_")) is stage
        assert stage.run.__module__ == stage.module


def test_an_unknown_stage_names_the_known_ones():
    for name in ("common", "resnet", "../teacher", "stage"):
        with pytest.raises(ConfigError, match=rf"unknown stage '{re.escape(name)}'.*assistant, detection-distill"):
            find(name)


def test_the_tasks_of_each_pipeline_come_from_its_dag(classification, detection_pipeline):
    tasks = {task.name: (task.settings, task.stage.name) for task in plan(classification, {"source": "s"})}
    assert tasks == {"prepare-data": ("prepare_data_settings", "prepare-data"),
                     "teacher": ("teacher_settings", "teacher"), "assistant": ("assistant_settings", "assistant"),
                     "student": ("student_settings", "student"),
                     "student-onestage": ("student_onestage_settings", "student"),
                     "lr-baseline": ("lr_baseline_settings", "lr-baseline"),
                     "export": ("export_settings", "export"), "evaluate": ("evaluate_settings", "evaluate")}
    tasks = {task.name: (task.settings, task.stage.name) for task in plan(detection_pipeline, {"source": "s"})}
    assert tasks == {"prepare-data": ("prepare_data_settings", "prepare-data"),
                     "teacher": ("teacher_settings", "detector"), "afp": ("afp_settings", "detection-distill"),
                     "msad": ("msad_settings", "detection-distill"),
                     "lr-baseline": ("lr_baseline_settings", "detector"), "export": ("export_settings", "export"),
                     "evaluate": ("evaluate_settings", "evaluate")}


def test_each_task_is_planned_with_the_dags_wiring(classification, detection_pipeline):
    configs = {task.name: task.config for task in plan(classification, {
        "source": "s", "student_arch": "resnet34", "hr_size": 96, "student_onestage_settings": {"method": "dkd"}})}
    assert configs["student"].method == "tas" and configs["student"].assistant and not configs["student"].teacher
    assert configs["student-onestage"].method == "dkd" and configs["student-onestage"].teacher
    assert configs["teacher"].arch == "resnet34" and configs["lr-baseline"].arch == "resnet34"
    assert configs["export"].model.startswith("student/")
    assert configs["evaluate"].exports["student"].startswith("export/")
    assert {config.hr_size for name, config in configs.items() if name not in ("prepare-data", "export")} == {96}
    configs = {task.name: task.config for task in plan(detection_pipeline, {"source": "s", "ratio": 4})}
    assert (configs["teacher"].view, configs["lr-baseline"].view) == ("hr", "lr")
    assert (configs["afp"].method, configs["msad"].method, configs["msad"].ratio) == ("afp", "msad", 4)
    assert configs["export"].model.endswith("/student")
    assert configs["evaluate"].models["msad_teacher"].endswith("/teacher")


def test_a_typed_parameter_that_is_set_wins_and_one_left_at_zero_leaves_the_settings(classification):
    configs = {task.name: task.config for task in plan(classification, {
        "source": "s", "epochs": 3, "lr": 0.2, "onestage_method": "dkd", "teacher_settings": {"epochs": 7}})}
    assert {name: (config.epochs, config.lr) for name, config in configs.items() if hasattr(config, "lr")} == {
        name: (3, 0.2) for name in ("teacher", "assistant", "student", "student-onestage", "lr-baseline")}
    assert (configs["student"].method, configs["student-onestage"].method) == ("tas", "dkd")
    configs = {task.name: task.config
               for task in plan(classification, {"source": "s", "teacher_settings": {"epochs": 7}})}
    assert (configs["teacher"].epochs, configs["teacher"].lr) == (7, 0.05)  # the settings, then the stage's default
    assert configs["student-onestage"].method == "kd+isrd"  # the task's settings default


def test_a_bad_setting_fails_naming_the_task_and_field(classification, detection_pipeline):
    cases = ((classification, {"student_onestage_settings": {"method": "kd+nope"}}, "student-onestage", "method"),
             (classification, {"onestage_method": "kd+nope"}, r"student-onestage \(parameter onestage_method\)",
              "method"),
             (classification, {"student_settings": {"assistant": "x"}}, "student", "assistant"),
             (classification, {"teacher_settings": {"epochs": "many"}}, "teacher", "epochs"),
             (classification, {"evaluate_settings": {"latency_repeats": 0}}, "evaluate", "latency_repeats"),
             (detection_pipeline, {"msad_settings": {"method": "afp"}}, "msad", "method"),
             (classification, {"teacher_sttings": {}}, "pixel-distillation", "teacher_sttings"))
    for pipeline, params, where, field in cases:
        with pytest.raises(ConfigError, match=rf"^{where}[ :].*field '{field}'"):
            plan(pipeline, {"source": "s", **params})


def test_kdp_stage_help_lists_the_stages(capsys):
    assert cli.main(["stage", "--help"]) == 0
    listed = capsys.readouterr().out
    for name in stages():
        line = next((line for line in listed.splitlines() if line.startswith(f"  {name} ")), None)
        assert line is not None, f"{name} is not listed"
        assert line.endswith("."), f"{name}'s summary is cut mid-sentence: {line!r}"
    assert cli.main(["stage"]) == 2
    assert "stages:" in capsys.readouterr().err
    assert cli.main(["stage", "teachr"]) == 2
    assert "unknown stage 'teachr'" in capsys.readouterr().err


def help_defaults(capsys, monkeypatch, stage: str) -> dict[str, str]:
    """``kdp stage STAGE --help``'s default of each field, as printed."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        cli.main(["stage", stage, "--help"])
    text = capsys.readouterr().out.partition("options:")[2]
    entries = re.split(r"\n  (?=-)", text)  # one per flag, its help on the same line or the next
    found = {}
    for entry in entries:
        flag = re.match(r"--([\w-]+) \[?[A-Z_]+\]?\s.*(?:default: (.*)|(REQUIRED))\)$", " ".join(entry.split()))
        if flag:
            found[flag[1].replace("-", "_")] = flag[2] or flag[3]
    return found


#: What the DAG tables set apart from the stages' defaults, besides what tasks read: each task's ``fixed``
#: fields, settings defaults and the parameters given their own defaults. Written out here, so that a new
#: difference between ``kdp stage`` and ``kdp run`` fails this test until it is declared and listed.
DAG_SET = {("classification", "student-onestage", "method"), ("detection", "teacher", "backbone"),
           ("detection", "lr-baseline", "view"), ("detection", "msad", "method"),
           ("detection", "evaluate", "latency_batch_sizes"), ("detection", "evaluate", "ratio")}


@pytest.mark.parametrize("name", ["classification", "detection"])
def test_kdp_stage_help_shows_what_kdp_run_uses(name, capsys, monkeypatch):
    """For every task: each field of its config that ``kdp run --data D`` passes equals the default that
    ``kdp stage NAME --help`` prints, except the fields the task reads from others, those the stage
    requires (no default), and those in DAG_SET."""
    pipeline = cli.PIPELINES[name][0]
    args = cli.build_parser().parse_args(["run" if name == "classification" else "detect", "--data", "d"])
    planned = pipeline.plan(cli.pipeline_params(args, "d", pipeline, ({}, None)))
    differs = set()
    for task, declared in zip(planned, pipeline.tasks):
        shown = help_defaults(capsys, monkeypatch, task.stage.name)
        read = set(pipeline.reads(declared)) | {key.partition(".")[0] for key in pipeline.reads(declared)}
        for spec in dataclasses.fields(task.config):
            if spec.name in read or spec.name in ("out", "source", "checkpoint_root", "gate", "code_version"):
                continue
            value = flag_text(getattr(task.config, spec.name)) or "''"
            assert spec.name in shown, (task.name, spec.name)
            if value != shown[spec.name] and shown[spec.name] != "REQUIRED":
                differs.add((name, task.name, spec.name))
                assert value != flag_text(field_default(spec)) or "''"
    assert differs == {case for case in DAG_SET if case[0] == name}


def test_the_demo_overrides_are_one_table(classification, detection_pipeline):
    """The demo runs every task with its stage's settings except what DEMO_SETTINGS (and the detection demo's
    typed parameters) say."""
    for pipeline, command, settings, params in (
            (classification, "run", cli.DEMO_SETTINGS, {}),
            (detection_pipeline, "detect", cli.DETECTION_DEMO_SETTINGS, cli.DETECTION_DEMO_PARAMS)):
        demo = cli.build_parser().parse_args([command])
        data = cli.build_parser().parse_args([command, "--data", "d"])
        with_demo = pipeline.plan(cli.pipeline_params(demo, "d", pipeline, (params, settings)))
        without = pipeline.plan({**cli.pipeline_params(data, "d", pipeline, (params, settings)), **params})
        for a, b in zip(with_demo, without):
            changed = {f.name: getattr(a.config, f.name) for f in dataclasses.fields(a.config)
                       if getattr(a.config, f.name) != getattr(b.config, f.name)}
            assert changed == settings.get(a.name, {}), a.name
    assert cli.DEMO_SETTINGS == {"teacher": {"epochs": 5, "lr": 0.02}, "assistant": {"epochs": 5, "lr": 0.02},
                                 "student": {"start_from_assistant": False}, "evaluate": {"latency_repeats": 5}}


THROWAWAY = '''"""throwaway: a stage declared by a test."""

import sys
from dataclasses import dataclass

from components.common import TrainStageConfig, run_supervised
from components.stage import Stage


@dataclass
class ThrowawayConfig(TrainStageConfig):
    teacher: str = ""
    """an HR model's output URI"""
    depth: int = 3
    """a setting of its own"""


def run(config):
    return run_supervised("throwaway", config, "lr")


STAGE = Stage("throwaway", ThrowawayConfig, run, trains=True)

if __name__ == "__main__":
    sys.exit(STAGE.main())
'''


def test_a_stage_is_its_declaration_and_one_line_of_the_dag(tmp_path, monkeypatch):
    (tmp_path / "throwaway.py").write_text(THROWAWAY)
    monkeypatch.setattr(components, "__path__", [*components.__path__, str(tmp_path)])
    stages.cache_clear()
    try:
        line = Task("throwaway", reads={"teacher": "teacher"}, params={"arch": "student_arch"}, gated=True)
        pipeline = dataclasses.replace(CLASSIFICATION, tasks=(*CLASSIFICATION.tasks, line))
        params = {"source": "s", "throwaway_settings": {"depth": 5}}
        planned = {task.name: task.config for task in pipeline.plan(params)}
        assert planned["throwaway"].depth == 5 and planned["throwaway"].teacher.startswith("teacher/")
        path = tmp_path / "p.yaml"
        compiler.Compiler().compile(pipeline.build(), str(path))
        spec = yaml.safe_load(path.read_text())
        assert {"throwaway_settings", "rerun_throwaway"} <= set(spec["root"]["inputDefinitions"]["parameters"])
        [task] = [dag["dag"]["tasks"]["throwaway"] for dag in spec["components"].values()
                  if "throwaway" in dag.get("dag", {}).get("tasks", {})]
        assert task["taskInfo"]["name"] == "throwaway"
        assert task["inputs"]["artifacts"]["teacher"]["componentInputArtifact"] == "pipelinechannel--teacher-model"
        assert task["inputs"]["parameters"]["settings"]["componentInputParameter"] == \
            "pipelinechannel--throwaway_settings"
        assert set(spec["components"]["comp-throwaway"]["inputDefinitions"]["parameters"]) >= {
            "arch", "hr_size", "ratio", "seed", "epochs", "lr", "settings", "launcher", "rerun_token"}
    finally:
        stages.cache_clear()

"""Stage declarations and the stage tasks read from each pipeline's DAG."""

import re

import pytest

from components.stage import Stage, find, stages
from kd_lib.config import ConfigError
from pipelines import cli, detection, pixel_distillation
from pipelines.tasks import plan


@pytest.fixture(scope="module")
def classification():
    return pixel_distillation.build_pipeline()


@pytest.fixture(scope="module")
def detection_pipeline():
    return detection.build_pipeline()


def test_every_stage_module_declares_its_stage():
    assert set(stages()) == {"prepare-data", "teacher", "assistant", "student", "lr-baseline", "detector", "afp",
                             "evaluate", "export"}
    assert {name for name, stage in stages().items() if stage.trains} == {
        "teacher", "assistant", "student", "lr-baseline", "detector", "afp"}
    for name, stage in stages().items():
        assert isinstance(stage, Stage) and find(name) is stage and find(name.replace("-", "_")) is stage
        assert stage.run.__module__ == stage.module


def test_an_unknown_stage_names_the_known_ones():
    for name in ("common", "resnet", "../teacher", "stage"):
        with pytest.raises(ConfigError, match=rf"unknown stage '{re.escape(name)}'.*afp, assistant"):
            find(name)


def test_the_tasks_of_each_pipeline_come_from_its_dag(classification, detection_pipeline):
    tasks = {task.name: (task.settings, task.stage.name) for task in plan(classification, {"source": "s"})}
    assert tasks == {"prepare-data": ("prepare_settings", "prepare-data"), "teacher": ("teacher_settings", "teacher"),
                     "assistant": ("assistant_settings", "assistant"), "student": ("student_settings", "student"),
                     "student-onestage": ("onestage_settings", "student"),
                     "lr-baseline": ("lr_baseline_settings", "lr-baseline"),
                     "export": ("export_settings", "export"), "evaluate": ("evaluate_settings", "evaluate")}
    tasks = {task.name: (task.settings, task.stage.name) for task in plan(detection_pipeline, {"source": "s"})}
    assert tasks == {"prepare-data": ("prepare_settings", "prepare-data"), "teacher": ("teacher_settings", "detector"),
                     "afp": ("afp_settings", "afp"), "msad": ("msad_settings", "afp"),
                     "lr-baseline": ("lr_baseline_settings", "detector"), "export": ("export_settings", "export"),
                     "evaluate": ("evaluate_settings", "evaluate")}


def test_each_task_is_planned_with_the_dags_wiring(classification, detection_pipeline):
    configs = {task.name: task.config for task in plan(classification, {
        "source": "s", "student_arch": "resnet34", "hr_size": 96, "onestage_settings": {"method": "dkd"}})}
    assert configs["student"].method == "tas" and configs["student"].assistant and not configs["student"].teacher
    assert configs["student-onestage"].method == "dkd" and configs["student-onestage"].teacher
    assert configs["teacher"].arch == "resnet34" and configs["lr-baseline"].arch == "resnet34"
    assert {config.hr_size for name, config in configs.items() if name not in ("prepare-data", "export")} == {96}
    configs = {task.name: task.config for task in plan(detection_pipeline, {"source": "s", "ratio": 4})}
    assert (configs["teacher"].view, configs["lr-baseline"].view) == ("hr", "lr")
    assert (configs["afp"].method, configs["msad"].method, configs["msad"].ratio) == ("afp", "msad", 4)


def test_the_typed_epochs_lr_and_methods_win_over_the_settings_defaults(classification):
    configs = {task.name: task.config for task in plan(classification, {
        "source": "s", "epochs": 3, "lr": 0.2, "onestage_method": "dkd", "teacher_settings": {"epochs": 12}})}
    assert {name: (config.epochs, config.lr) for name, config in configs.items() if hasattr(config, "lr")} == {
        name: (3, 0.2) for name in ("teacher", "assistant", "student", "student-onestage", "lr-baseline")}
    assert (configs["student"].method, configs["student-onestage"].method) == ("tas", "dkd")
    configs = {task.name: task.config for task in plan(classification, {"source": "s"})}
    assert (configs["teacher"].epochs, configs["teacher"].lr) == (12, 0.05)  # the settings' defaults


def test_a_bad_setting_fails_naming_the_task_and_field(classification, detection_pipeline):
    cases = ((classification, {"onestage_settings": {"method": "kd+nope"}}, "student-onestage", "method"),
             (classification, {"teacher_settings": {"epochs": "many"}}, "teacher", "epochs"),
             (classification, {"evaluate_settings": {"latency_repeats": 0}}, "evaluate", "latency_repeats"),
             (detection_pipeline, {"msad_settings": {"method": "afp"}}, "msad", "method"),
             (classification, {"teacher_sttings": {}}, "pixel-distillation", "teacher_sttings"))
    for pipeline, params, where, field in cases:
        with pytest.raises(ConfigError, match=rf"^{where}\b.*field '{field}'"):
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

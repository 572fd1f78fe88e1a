"""``kdp compile`` and ``kdp schedule`` on the command line, and the TorchX launcher of a training task."""

import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.stage import stages
from kd_lib.config import field_help
from pipelines import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "pipelines" / "pixel_distillation.yaml")


def schedule_args(*extra: str) -> list[str]:
    return ["schedule", "--host", "http://kfp.example:8080", "--pipeline-package", PACKAGE, "--experiment",
            "nightly", "--cron", "0 0 3 * * *", "--name", "retrain", "--param", "source=gs://b/imagenet",
            "--param", "checkpoint_root=gs://b/ckpt", *extra]


def test_kdp_compile_writes_the_pipeline_for_the_image(tmp_path, capsys):
    path = tmp_path / "out" / "detection.yaml"
    assert cli.main(["compile", "--pipeline", "detection", "--image", "registry.example/kdp:2.0", "-o",
                     str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    spec = next(yaml.safe_load_all(path.read_text()))
    assert spec["pipelineInfo"]["name"] == "detection-distillation"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example/kdp:2.0"}


def test_kdp_compile_refuses_bad_options_naming_them(tmp_path, capsys):
    out = ["compile", "-o", str(tmp_path / "p.yaml")]
    for flags, named in ((["--tolerations", "nvidia.com/gpu:Never"], "tolerations"), (["--gpus", "two"], "gpus"),
                         (["--memory", "32GB"], "memory"), (["--launcher", "slurm"], "launcher"),
                         (["--node-selector", "gpu"], "node_selector")):
        assert cli.main([*out, *flags]) == 2, flags
        assert f"field {named!r}" in capsys.readouterr().err, flags
    assert not (tmp_path / "p.yaml").exists()


def stand_in_for_kfp_client(calls: list, results: dict) -> type:
    """A class with ``kfp.Client``'s methods named in ``results``: each call is bound to the real
    method's signature (a name ``kfp.Client`` does not take raises TypeError, as it would on a
    server), recorded in ``calls`` as ``(method, arguments)`` and answered with ``results[method]``."""
    import kfp

    def stand_in(name: str):
        signature = inspect.signature(getattr(kfp.Client, name))

        def method(self, *args, **kwargs):
            arguments = signature.bind(self, *args, **kwargs).arguments
            calls.append((name, {k: v for k, v in arguments.items() if k != "self"}))
            return results[name]
        return method

    return type("StandInClient", (), {name: stand_in(name) for name in results})


def test_kdp_schedule_dry_run_prints_a_command_that_creates_the_same_recurring_run(capsys, monkeypatch):
    extra = ("--param", "hr_size=96", "--param", 'teacher_settings={"epochs": 30}', "--param",
             "rerun_teacher=2026-01-01", "--max-concurrency", "2")
    assert cli.main(schedule_args(*extra, "--dry-run")) == 0
    command = capsys.readouterr().out
    first, *script, last = command.strip().splitlines()
    assert first == "python3 - <<'EOF'" and last == "EOF"
    printed, created = [], []
    answers = {"__init__": None, "create_experiment": SimpleNamespace(experiment_id="exp-1"),
               "create_recurring_run": SimpleNamespace(recurring_run_id="rr-7")}
    printing, creating = stand_in_for_kfp_client(printed, answers), stand_in_for_kfp_client(created, answers)
    monkeypatch.setitem(sys.modules, "kfp", SimpleNamespace(Client=printing))
    exec("\n".join(script), {})
    args = cli.build_parser().parse_args(schedule_args(*extra))
    assert cli.cmd_schedule(args, client_factory=creating) == 0
    assert printed == created
    run = created[-1][1]
    assert run["enabled"] is True and run["enable_caching"] is True and run["max_concurrency"] == 2
    assert run["params"] == {"source": "gs://b/imagenet", "checkpoint_root": "gs://b/ckpt", "hr_size": 96,
                             "teacher_settings": {"epochs": 30}, "rerun_teacher": "2026-01-01"}


def test_kdp_schedule_checks_its_arguments(capsys):
    cases = (
        (["--cron", "0 3 * * *"], "6 fields"),
        (["--cron", "0 0 25 * * *"], "'0 0 25 * * *' is not a valid cron expression"),
        (["--cron", "0 0 3 * * Funday"], "is not a valid cron expression"),
        (["--param", "hr_sise=96"], "got 'hr_sise=96'"),
        (["--param", "hr_size=big"], "hr_size is a NUMBER_INTEGER parameter"),
        (["--param", "teacher_settings=epochs"], "teacher_settings is a STRUCT parameter"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--pipeline-package", "missing.yaml"], "no such file"),
    )
    for extra, message in cases:
        assert cli.main([*schedule_args(*extra), "--dry-run"]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert cli.main(["schedule", "--host", "h", "--pipeline-package", PACKAGE, "--experiment", "e", "--cron",
                     "0 0 3 * * *", "--name", "n", "--dry-run"]) == 2
    assert "the pipeline needs checkpoint_root, source" in capsys.readouterr().err


def test_a_five_field_cron_is_refused_with_the_seconds_hint(capsys):
    assert cli.main([*schedule_args("--cron", "0 3 * * *"), "--dry-run"]) == 2
    assert "add the seconds first, e.g. '0 0 3 * * *'" in capsys.readouterr().err


def test_kdp_schedule_creates_the_recurring_run_through_the_client(capsys):
    """There is no KFP server here: a stand-in for ``kfp.Client`` with its signatures records what
    kdp asks of it."""
    calls = []
    StandInClient = stand_in_for_kfp_client(calls, {
        "__init__": None, "create_experiment": SimpleNamespace(experiment_id="exp-1"),
        "create_recurring_run": SimpleNamespace(recurring_run_id="rr-7")})

    args = cli.build_parser().parse_args(schedule_args("--param", "seed=3"))
    assert cli.cmd_schedule(args, client_factory=StandInClient) == 0
    assert calls == [("__init__", {"host": "http://kfp.example:8080"}), ("create_experiment", {"name": "nightly"}),
                     ("create_recurring_run", {
        "experiment_id": "exp-1", "job_name": "retrain", "cron_expression": "0 0 3 * * *", "max_concurrency": 1,
        "params": {"source": "gs://b/imagenet", "checkpoint_root": "gs://b/ckpt", "seed": 3},
        "pipeline_package_path": PACKAGE, "enable_caching": True, "enabled": True})]
    assert "rr-7" in capsys.readouterr().out


def test_flags_rebuild_the_stage_config():
    import argparse

    from components.kfp_entry import task_config
    from kd_lib.config import add_arguments, from_args, to_flags

    wiring = {"stage": "student", "output": "model", "params": ["hr_size", "ratio", "seed", "checkpoint_root"],
              "fixed": {"data": "gs://b/data", "teacher": "gs://b/t"}, "reads": {}}
    config = task_config(wiring, {"settings": {"method": "kd+isrd", "epochs": 3.0, "amp": False, "milestones": [1, 2],
                                               "schedule": "step", "lr": 2e-4}, "model": SimpleNamespace(uri="gs://b/s"),
                                  "hr_size": 64, "ratio": 4, "seed": 0, "checkpoint_root": ""})
    flags = to_flags(config)
    assert "--seed" not in flags and flags[flags.index("--amp") + 1] == "false"
    parser = argparse.ArgumentParser()
    add_arguments(parser, type(config))
    assert from_args(type(config), parser.parse_args(flags)) == config


def test_the_torchx_launcher_runs_the_stage_as_a_job_and_reads_its_manifest(tmp_path, monkeypatch):
    """The job gets the stage's flags and the pod settings of the KFP tasks: GCS key, node selector, tolerations."""
    import components.torchx_apps as torchx_apps
    from components.kfp_entry import run_task
    from components.pod import PodSettings
    from kd_lib.io.publish import Publication
    from pipelines.cluster import ClusterOptions, launcher_input

    out = str(tmp_path / "teacher")
    launched = []

    def stand_in_launch(stage, args, **options):
        launched.append((stage, args, options))
        with Publication(out, stage, "k") as publication:
            publication.commit([], {"final": {"val_top1": 0.5}})

    monkeypatch.setattr(torchx_apps, "launch_and_wait", stand_in_launch)
    metrics = SimpleNamespace(path=str(tmp_path / "metrics.json"), logged={})
    metrics.log_metric = metrics.logged.__setitem__
    options = ClusterOptions(launcher="torchx", nnodes=2, gpus=4, torchx_cfg="queue=gpu", gcs_secret="kdp-gcs",
                             gcs_secret_key="sa.json", node_selector={"pool": "a100"}, tolerations=["gpu:NoExecute"],
                             image_train="registry.example/kdp:2.0")
    launcher = launcher_input(options)
    launcher.update(nnodes=2.0, nproc_per_node=4.0)  # KFP hands numbers of a STRUCT over as floats
    wiring = {"stage": "lr-baseline", "output": "model", "fixed": {}, "params": ["hr_size", "seed", "epochs"],
              "reads": {"data": ["data", ""]}}
    run_task(wiring, {"data": SimpleNamespace(uri="gs://b/data"), "model": SimpleNamespace(uri=out), "metrics": metrics,
                      "settings": {"epochs": 3}, "hr_size": 64, "seed": 0, "epochs": 2, "launcher": launcher,
                      "rerun_token": "again", "code_version": "c"})
    [(stage, args, options)] = launched
    assert stage == "lr-baseline" and args == ["--epochs", "2", "--data", "gs://b/data", "--out", out]
    assert options == {"scheduler": "kubernetes", "nnodes": 2, "nproc_per_node": 4,
                       "image": "registry.example/kdp:2.0", "cfg": "queue=gpu",
                       "pod": PodSettings({"pool": "a100"}, ["gpu:NoExecute"], "kdp-gcs", "sa.json")}
    assert metrics.logged == {"val_top1": 0.5}
    assert json.loads(Path(metrics.path).read_text()) == {"val_top1": 0.5}


def test_kdp_run_refuses_a_bad_setting_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    cases = ((["--student-arch", "resnet19"], r"^kdp: error: [\w-]+ \(parameter student_arch\): field 'arch': "
                                              r"unknown torchvision architecture 'resnet19' \(close matches: resnet18"),
             (["--teacher-arch", "timm:resnet5O"], r"field 'arch': unknown timm model 'resnet5O'"),
             (["--set", "student-onestage.method=kd+isdr"], r"student-onestage \(student_onestage_settings\): field 'method'"),
             (["--set", "teacher.lr=fast"], r"teacher \(teacher_settings\): field 'lr': must be a number"),
             (["--set", "teachr.lr=0.1"], r"field '--set': expected TASK.FIELD=VALUE with TASK one of .*teacher"))
    for argv, message in cases:
        assert cli.main(["run", "--out", str(out), *argv]) == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    assert cli.main(["detect", "--data", str(tmp_path / "coco.json"), "--images", str(tmp_path), "--out", str(out),
                     "--student-backbone", "resnet19"]) == 2
    assert re.search(r"\w+ \(parameter student_backbone\): field 'backbone': unknown detector backbone .*'resnet19' "
                     r"\(close matches: resnet18", capsys.readouterr().err)
    assert not out.exists(), "a refused run wrote something"


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_stage_field_has_help(name):
    config = stages()[name].config
    helps = field_help(config)
    assert [f.name for f in dataclasses.fields(config) if not helps.get(f.name)] == []


def test_kdp_version_and_field_help(capsys):
    import tomllib

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"kdp {project['version']}"
    with pytest.raises(SystemExit):
        cli.main(["stage", "evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--models MODELS name=URI of each model to evaluate (REQUIRED)" in text
    assert "--resize RESIZE how the LR image is made from the HR one (choices: bilinear, area, bicubic, " \
           "nearest; default: bilinear)" in text
    assert "forwards timed per batch size (the median is reported) (default: 10)" in text
    with pytest.raises(SystemExit):
        cli.main(["stage", "lr-baseline", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data DATA the prepare-data output URI (REQUIRED)" in text

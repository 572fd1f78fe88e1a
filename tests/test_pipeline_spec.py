"""The pipelines compile to KFP v2 IR with the stages wired as designed, and the compiled YAML
carries each task's resources, pod settings, caching and rerun parameter."""

from pathlib import Path

import pytest
import yaml
from kfp import compiler

from components.image import IMAGES
from components.kfp_entry import DETECTION_MODELS
from pipelines import cli
from pipelines.cluster import ClusterOptions
from pipelines.pixel_distillation import build_pipeline

ROOT = Path(__file__).resolve().parents[1]
#: Display name -> training task?, per pipeline.
TASKS = {
    "classification": {"source-version": False, "prepare-data": False, "teacher": True, "assistant": True, "student": True,
                       "student-onestage": True, "lr-baseline": True, "teacher-gate": False, "export": False,
                       "evaluate": False},
    "detection": {"source-version": False, "prepare-data": False, "teacher": True, "afp": True, "msad": True, "lr-baseline": True,
                  "export": False, "evaluate": False},
}
#: Display name -> the pipeline parameter that reruns it.
RERUN = {"prepare-data": "rerun_prepare", "teacher": "rerun_teacher", "assistant": "rerun_assistant",
         "student": "rerun_student", "student-onestage": "rerun_onestage", "afp": "rerun_afp",
         "msad": "rerun_msad", "lr-baseline": "rerun_lr_baseline", "export": "rerun_export",
         "evaluate": "rerun_evaluate"}


class Compiled:
    """A compiled pipeline, looked up by task display name."""

    def __init__(self, path: Path):
        documents = list(yaml.safe_load_all(path.read_text()))
        self.spec = documents[0]
        self.platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] \
            if len(documents) > 1 else {}
        dags = [self.spec["root"]["dag"], *(c["dag"] for c in self.spec["components"].values() if "dag" in c)]
        # tasks inside conditions live in their branch's DAG; the two evaluate tasks are configured alike
        self.tasks = {task["taskInfo"]["name"]: task for dag in dags for task in dag["tasks"].values()
                      if "executorLabel" in self.spec["components"][task["componentRef"]["name"]]}

    def executor_name(self, task: str) -> str:
        component = self.tasks[task]["componentRef"]["name"]
        return self.spec["components"][component]["executorLabel"]

    def container(self, task: str) -> dict:
        return self.spec["deploymentSpec"]["executors"][self.executor_name(task)]["container"]

    def kubernetes(self, task: str) -> dict:
        return self.platform.get(self.executor_name(task), {})


def compiled(tmp_path, pipeline="classification", *flags) -> Compiled:
    path = tmp_path / f"{pipeline}.yaml"
    assert cli.main(["compile", "--pipeline", pipeline, "-o", str(path), *flags]) == 0
    return Compiled(path)


def test_pipeline_compiles_with_every_stage_wired(tmp_path):
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(), str(path))
    spec = yaml.safe_load(path.read_text())
    dags = {"root": spec["root"]["dag"]["tasks"],
            **{name: c["dag"]["tasks"] for name, c in spec["components"].items() if "dag" in c}}
    tasks = {name: task for dag in dags.values() for name, task in dag.items() if not name.startswith("condition")}
    assert set(tasks) == {"source-version-op", "prepare-data-op", "teacher-op", "assistant-op", "student-op", "student-op-2",
                          "lr-baseline-op", "teacher-gate-op", "export-op", "evaluate-op", "evaluate-op-2"}
    # the assistant, the students and the full evaluation run only if the gate passes; else the short evaluation
    branches = dags["comp-condition-branches-1"]
    passed = "inputs.parameter_values['pipelinechannel--teacher-gate-op-passed'] == true"
    assert branches["condition-2"]["triggerPolicy"]["condition"] == passed
    assert branches["condition-3"]["triggerPolicy"]["condition"] == f"!({passed})"
    assert set(dags["comp-condition-2"]) == {"assistant-op", "student-op", "student-op-2", "export-op", "evaluate-op"}
    assert set(dags["comp-condition-3"]) == {"evaluate-op-2"}
    assert "min_teacher_margin" in tasks["teacher-gate-op"]["inputs"]["parameters"]

    def producer(task, name, kind="artifacts"):
        """The task whose output feeds input ``name`` of ``task``, across the condition's boundary."""
        source = tasks[task]["inputs"][kind][name]
        if "taskOutputArtifact" in source or "taskOutputParameter" in source:
            return (source.get("taskOutputArtifact") or source["taskOutputParameter"])["producerTask"]
        channel = source.get("componentInputArtifact") or source["componentInputParameter"]
        return channel.removeprefix("pipelinechannel--").rsplit("-", 1)[0]

    assert producer("student-op", "source") == "assistant-op" and producer("student-op-2", "source") == "teacher-op"
    assert [producer("teacher-gate-op", a) for a in ("teacher", "lr_baseline")] == ["teacher-op", "lr-baseline-op"]
    assert [producer("evaluate-op-2", a) for a in ("teacher", "lr_baseline")] == ["teacher-op", "lr-baseline-op"]
    assert "student" not in tasks["evaluate-op-2"]["inputs"]["artifacts"]
    assert producer("export-op", "source") == "student-op" and producer("evaluate-op", "student_export") == "export-op"
    assert producer("teacher-op", "weights", "parameters") == "teacher_weights"
    assert producer("lr-baseline-op", "weights", "parameters") == "student_weights"
    for name in ("teacher-op", "assistant-op", "student-op", "lr-baseline-op"):
        assert producer(name, "data_fingerprint", "parameters") == "prepare-data-op"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == set(IMAGES.values())  # without cluster options too, each task its role's image
    commands = " ".join(" ".join(e["container"]["command"]) for e in spec["deploymentSpec"]["executors"].values())
    assert "pip install" not in commands  # install_kfp_package=False: the image brings kfp
    assert spec["root"]["inputDefinitions"]["parameters"]["hr_size"]["defaultValue"] == 64


def test_source_fingerprint_follows_the_code(tmp_path, monkeypatch):
    import pipelines.local as local

    for package in local.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "local.py").write_text("x = 1\n")
    monkeypatch.setattr(local, "__file__", str(tmp_path / "pipelines" / "local.py"))
    first = local.source_fingerprint()
    assert local.source_fingerprint() == first
    (tmp_path / "kd_lib" / "loss.py").write_text("y = 2\n")
    assert local.source_fingerprint() != first


def test_the_detection_pipeline_compiles_with_its_stages_wired(tmp_path):
    from pipelines import detection

    path = tmp_path / "detection.yaml"
    compiler.Compiler().compile(detection.build_pipeline(), str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"source-version-op", "prepare-detection-op", "detector-op", "afp-op", "afp-op-2", "detector-op-2",
                          "export-op", "evaluate-detection-op"}

    def producer(task, artifact):
        return tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]["producerTask"]

    def constant(task, name):
        return tasks[task]["inputs"]["parameters"][name]["runtimeValue"]["constant"]

    assert producer("afp-op", "teacher") == producer("afp-op-2", "teacher") == "detector-op"
    assert (constant("afp-op", "method"), constant("afp-op-2", "method")) == ("afp", "msad")
    assert (constant("detector-op", "view"), constant("detector-op-2", "view")) == ("hr", "lr")
    assert [producer("evaluate-detection-op", a) for a in ("teacher", "afp", "msad", "lr_baseline", "student_export")
            ] == ["detector-op", "afp-op", "afp-op-2", "detector-op-2", "export-op"]
    assert producer("export-op", "source") == "afp-op" and constant("export-op", "folder") == "student"
    assert tasks["detector-op"]["inputs"]["parameters"]["weights"]["componentInputParameter"] == \
        "teacher_backbone_weights"
    for name in ("detector-op", "afp-op", "afp-op-2", "detector-op-2"):
        fingerprint = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert fingerprint["producerTask"] == "prepare-detection-op"
    assert set(DETECTION_MODELS) == {"teacher", "assistant", "student_afp", "msad_teacher", "student_msad",
                                        "lr_baseline"}


@pytest.mark.parametrize("pipeline", sorted(cli.PIPELINES))
def test_the_checked_in_yaml_is_a_fresh_compile_with_the_defaults(tmp_path, pipeline):
    _, checked_in = cli.PIPELINES[pipeline]
    fresh = cli.compile_pipeline(pipeline, tmp_path / "fresh.yaml")
    again = cli.compile_pipeline(pipeline, tmp_path / "again.yaml")
    assert fresh.read_bytes() == again.read_bytes(), "compiling is not deterministic"
    assert fresh.read_text() == (ROOT / checked_in).read_text(), (
        f"{checked_in} is out of date: run kdp compile --pipeline {pipeline}")


@pytest.mark.parametrize("pipeline", sorted(TASKS))
def test_training_tasks_ask_for_gpus_cpu_memory_and_gpu_nodes(tmp_path, pipeline):
    spec = compiled(tmp_path, pipeline)
    defaults = ClusterOptions()
    for name in (n for n, training in TASKS[pipeline].items() if training):
        resources = spec.container(name)["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
        assert resources["accelerator"]["resourceCount"] == "1", name
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == ("8", "8"), name
        assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == ("32Gi", "32Gi"), name
        k8s = spec.kubernetes(name)
        assert k8s["nodeSelector"]["labels"] == defaults.node_selector, name
        assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("pipeline", sorted(TASKS))
def test_training_tasks_retry_with_backoff_and_the_others_do_not(tmp_path, pipeline):
    """A preempted training pod fails its task; the retry resumes the stage from its checkpoint."""
    spec = compiled(tmp_path, pipeline)
    for name, training in TASKS[pipeline].items():
        policy = spec.tasks[name].get("retryPolicy")
        assert policy == ({"maxRetryCount": 3, "backoffDuration": "60s", "backoffFactor": 2.0,
                           "backoffMaxDuration": "21600s"} if training else None), name
    spec = compiled(tmp_path, pipeline, "--retries", "0")
    assert not [name for name, task in spec.tasks.items() if "retryPolicy" in task]


@pytest.mark.parametrize("pipeline", sorted(TASKS))
def test_every_task_gets_shm_and_the_gcs_secret(tmp_path, pipeline):
    spec = compiled(tmp_path, pipeline)
    for name in TASKS[pipeline]:
        k8s = spec.kubernetes(name)
        assert k8s["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                          "sizeLimit": "16Gi"}], name
        [secret] = k8s["secretAsVolume"]
        assert (secret["secretName"], secret["mountPath"]) == ("gcs-credentials", "/var/secrets/gcs"), name
        env = {e["name"]: e["value"] for e in spec.container(name)["env"]}
        assert env == {"GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/gcs/key.json"}, name


@pytest.mark.parametrize("pipeline", sorted(TASKS))
def test_prepare_data_and_evaluate_get_cpu_and_memory_but_no_gpu(tmp_path, pipeline):
    spec = compiled(tmp_path, pipeline)
    for name in ("prepare-data", "evaluate"):
        resources = spec.container(name)["resources"]
        assert "accelerator" not in resources, name
        assert (resources["resourceCpuRequest"], resources["resourceMemoryLimit"]) == ("4", "16Gi"), name
        assert "nodeSelector" not in spec.kubernetes(name) and "tolerations" not in spec.kubernetes(name)


@pytest.mark.parametrize("pipeline", sorted(TASKS))
def test_every_task_is_cached_and_rerun_by_its_own_parameter(tmp_path, pipeline):
    spec = compiled(tmp_path, pipeline)
    parameters = spec.spec["root"]["inputDefinitions"]["parameters"]
    assert set(spec.tasks) == set(TASKS[pipeline])
    fed = {}
    version = spec.tasks.pop("source-version")  # lists the data in every run, so it is never cached
    gate = spec.tasks.pop("teacher-gate", None)  # cached on its inputs alone: the two models and the margin
    assert gate is None or (gate["cachingOptions"] == {"enableCache": True}
                            and "rerun_token" not in gate["inputs"]["parameters"])
    assert version["cachingOptions"] == {} and "rerun_token" not in version["inputs"]["parameters"]
    source_version = spec.tasks["prepare-data"]["inputs"]["parameters"]["source_version"]["taskOutputParameter"]
    assert source_version == {"outputParameterKey": "Output", "producerTask": "source-version-op"}
    for name, task in spec.tasks.items():
        assert task["cachingOptions"] == {"enableCache": True}, name
        # a task inside a condition reads the pipeline parameter through its branch's input of the same name
        source = task["inputs"]["parameters"]["rerun_token"]["componentInputParameter"].removeprefix(
            "pipelinechannel--")
        fed.setdefault(source, []).append(name)
        assert parameters[source] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
    assert fed == {RERUN[name]: [name] for name in TASKS[pipeline] if name not in ("source-version", "teacher-gate")}
    assert not [p for p in parameters if p.startswith("rerun_") and p not in fed]


@pytest.mark.parametrize("path", ["pixel_distillation.yaml", "detection_distillation.yaml"])
def test_code_version_is_an_input_of_every_cached_task(path):
    """The cache keys a task on its inputs: with ``code_version`` among them, new code reruns it."""
    spec = Compiled(ROOT / "pipelines" / path)
    cached = {name: task for name, task in spec.tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert set(cached) == set(spec.tasks) - {"source-version"}
    for name, task in cached.items():
        source = task["inputs"]["parameters"]["code_version"]["componentInputParameter"]
        assert source.removeprefix("pipelinechannel--") == "code_version", name  # also through a condition
    assert spec.spec["root"]["inputDefinitions"]["parameters"]["code_version"]["parameterType"] == "STRING"


def test_the_ops_keep_the_rerun_token_from_the_stage(monkeypatch):
    import components.kfp_entry as entry
    from pipelines import detection, pixel_distillation

    calls = []
    monkeypatch.setattr(entry, "run_stage", lambda *args, **fields: calls.append((args, fields)))

    class Uri:
        uri, path = "memory://x", "/dev/null"

    common = dict(data=Uri, data_fingerprint="f", code_version="c", rerun_token="again", launcher={"kind": "pod"},
                  settings={}, epochs=0, lr=0.0, ratio=4, seed=0, checkpoint_root="", model=Uri, metrics=Uri)
    pixel_distillation.teacher_op(arch="resnet18", weights="", hr_size=64, **common)
    detection.afp_op(teacher=Uri, method="afp", kind="fcos", backbone="resnet18", weights="", fpn_channels=256,
                     **common)
    for args, fields in calls:
        assert "again" not in args and "again" not in fields.values() and "rerun_token" not in fields
        assert args[-1] == {"kind": "pod"}


def test_compile_options_change_the_yaml(tmp_path):
    spec = compiled(tmp_path, "classification", "--gpus", "2", "--accelerator", "nvidia.com/mig-1g.10gb",
                    "--cpu", "16", "--memory", "64Gi", "--node-selector",
                    "cloud.google.com/gke-accelerator=nvidia-l4", "--tolerations",
                    "nvidia.com/gpu=present:NoSchedule,spot:NoExecute", "--shm-size", "4Gi",
                    "--gcs-secret", "sa-key", "--gcs-secret-key", "sa.json", "--pipeline-root", "gs://runs/kfp")
    assert spec.spec["defaultPipelineRoot"] == "gs://runs/kfp"
    resources = spec.container("teacher")["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("16", "64Gi")
    k8s = spec.kubernetes("teacher")
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert k8s["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute"}]
    assert k8s["emptyDirMounts"][0]["sizeLimit"] == "4Gi"
    assert k8s["secretAsVolume"][0]["secretName"] == "sa-key"
    assert spec.container("teacher")["env"] == [{"name": "GOOGLE_APPLICATION_CREDENTIALS",
                                                 "value": "/var/secrets/gcs/sa.json"}]


def test_empty_compile_options_turn_their_settings_off(tmp_path):
    spec = compiled(tmp_path, "detection", "--gpus", "0", "--node-selector", "", "--tolerations", "",
                    "--shm-size", "", "--gcs-secret", "", "--aux-cpu", "", "--aux-memory", "")
    assert "accelerator" not in spec.container("teacher")["resources"]
    assert spec.container("teacher")["resources"]["resourceCpuRequest"] == "8"
    assert "resources" not in spec.container("evaluate") and "env" not in spec.container("teacher")
    assert spec.platform == {}


def test_the_torchx_launcher_hands_training_to_a_job_and_the_task_only_waits(tmp_path):
    spec = compiled(tmp_path, "detection", "--launcher", "torchx", "--nnodes", "2", "--gpus", "4",
                    "--image", "registry.example/kdp:2.0", "--torchx-cfg", "queue=gpu,namespace=ml",
                    "--gcs-secret", "kdp-gcs", "--node-selector", "pool=a100")
    for name, training in TASKS["detection"].items():
        resources = spec.container(name)["resources"]
        assert "accelerator" not in resources and resources["resourceCpuRequest"] == "4", name
        assert "nodeSelector" not in spec.kubernetes(name) and spec.kubernetes(name)["secretAsVolume"]
        if training:
            launcher = spec.tasks[name]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"]
            # the job's pods get the task's GCS key, node selector and tolerations
            assert launcher == {"kind": "torchx", "scheduler": "kubernetes", "nnodes": 2, "nproc_per_node": 4,
                                "image": "registry.example/kdp:2.0", "cfg": "queue=gpu,namespace=ml",
                                "gcs_secret": "kdp-gcs", "gcs_secret_key": "key.json",
                                "node_selector": {"pool": "a100"}, "tolerations": ["nvidia.com/gpu:NoSchedule"]}
    pod = compiled(tmp_path, "detection")
    assert pod.tasks["afp"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"] == {"kind": "pod"}

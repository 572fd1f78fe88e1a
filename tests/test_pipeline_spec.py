"""The pipelines compile to KFP v2 IR with the stages wired as designed, and the compiled YAML
carries each task's resources, pod settings, caching and rerun parameter."""

from pathlib import Path

import pytest
import yaml
from kfp import compiler

from components.image import IMAGES
from pipelines import cli, detection, pixel_distillation
from pipelines.cluster import ClusterOptions

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
RERUN = {"prepare-data": "rerun_prepare_data", "teacher": "rerun_teacher", "assistant": "rerun_assistant",
         "student": "rerun_student", "student-onestage": "rerun_student_onestage", "afp": "rerun_afp",
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
    compiler.Compiler().compile(pixel_distillation.PIPELINE.build(), str(path))
    spec = yaml.safe_load(path.read_text())
    dags = {"root": spec["root"]["dag"]["tasks"],
            **{name: c["dag"]["tasks"] for name, c in spec["components"].items() if "dag" in c}}
    tasks = {name: task for dag in dags.values() for name, task in dag.items() if not name.startswith("condition")}
    assert set(tasks) == {"source-version", "prepare-data", "teacher", "assistant", "student", "student-onestage",
                          "lr-baseline", "teacher-gate", "export", "evaluate", "evaluate-ungated"}
    # the assistant, the students and the full evaluation run only if the gate passes; else the short evaluation
    branches = dags["comp-condition-branches-1"]
    passed = "inputs.parameter_values['pipelinechannel--teacher-gate-passed'] == true"
    assert branches["condition-2"]["triggerPolicy"]["condition"] == passed
    assert branches["condition-3"]["triggerPolicy"]["condition"] == f"!({passed})"
    assert set(dags["comp-condition-2"]) == {"assistant", "student", "student-onestage", "export", "evaluate"}
    assert set(dags["comp-condition-3"]) == {"evaluate-ungated"}
    assert tasks["evaluate-ungated"]["taskInfo"]["name"] == "evaluate"
    assert "min_teacher_margin" in tasks["teacher-gate"]["inputs"]["parameters"]

    def producer(task, name, kind="artifacts"):
        """The task whose output feeds input ``name`` of ``task``, across the condition's boundary."""
        source = tasks[task]["inputs"][kind][name]
        if "taskOutputArtifact" in source or "taskOutputParameter" in source:
            return (source.get("taskOutputArtifact") or source["taskOutputParameter"])["producerTask"]
        channel = source.get("componentInputArtifact") or source["componentInputParameter"]
        return channel.removeprefix("pipelinechannel--").rsplit("-", 1)[0]

    assert producer("student", "assistant") == "assistant" and producer("student-onestage", "teacher") == "teacher"
    assert [producer("teacher-gate", a) for a in ("teacher", "lr_baseline")] == ["teacher", "lr-baseline"]
    assert [producer("evaluate-ungated", a) for a in ("teacher", "lr_baseline")] == ["teacher", "lr-baseline"]
    assert set(tasks["evaluate-ungated"]["inputs"]["artifacts"]) == {"data", "teacher", "lr_baseline"}
    assert producer("export", "student") == "student" and producer("evaluate", "export") == "export"
    assert producer("teacher", "weights", "parameters") == "teacher_weights"
    assert producer("lr-baseline", "weights", "parameters") == "student_weights"
    assert "weights" not in tasks["student"]["inputs"]["parameters"]  # the TAS student starts from the assistant
    assert producer("student", "method", "parameters") == "student_method"
    assert producer("student-onestage", "method", "parameters") == "onestage_method"
    for name in ("teacher", "assistant", "student", "lr-baseline"):
        assert producer(name, "data_fingerprint", "parameters") == "prepare-data"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == set(IMAGES.values())  # without cluster options too, each task its role's image
    commands = " ".join(" ".join(e["container"]["command"]) for e in spec["deploymentSpec"]["executors"].values())
    assert "pip install" not in commands  # install_kfp_package=False: the image brings kfp
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["hr_size"] == {"defaultValue": 64.0, "isOptional": True, "parameterType": "NUMBER_INTEGER"}
    assert parameters["student_onestage_settings"]["defaultValue"] == {"method": "kd+isrd"}
    assert parameters["lr"]["parameterType"] == "NUMBER_DOUBLE" and parameters["onestage_method"]["defaultValue"] == ""
    assert "defaultValue" not in parameters["source"] and "defaultValue" not in parameters["checkpoint_root"]


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
    path = tmp_path / "detection.yaml"
    compiler.Compiler().compile(detection.PIPELINE.build(), str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"source-version", "prepare-data", "teacher", "afp", "msad", "lr-baseline", "export",
                          "evaluate"}

    def producer(task, artifact):
        return tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]["producerTask"]

    def wiring(task):
        """The constants a task's component passes to its stage (in the component's source)."""
        source = spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["command"][-1]
        return eval(source.rpartition("run_task(")[2].rpartition(", inputs)")[0])  # a literal dict

    assert producer("afp", "teacher") == producer("msad", "teacher") == "teacher"
    assert (wiring("afp")["fixed"], wiring("msad")["fixed"]) == ({"method": "afp"}, {"method": "msad"})
    assert (wiring("teacher")["fixed"], wiring("lr-baseline")["fixed"]) == ({"view": "hr"}, {"view": "lr"})
    assert [producer("evaluate", a) for a in ("teacher", "afp", "msad", "lr_baseline", "export")
            ] == ["teacher", "afp", "msad", "lr-baseline", "export"]
    assert wiring("evaluate")["reads"]["models.msad_teacher"] == ["msad", "teacher"]
    assert producer("export", "afp") == "afp" and wiring("export")["reads"] == {"data": ["data", ""],
                                                                              "model": ["afp", "student"]}
    assert tasks["teacher"]["inputs"]["parameters"]["weights"]["componentInputParameter"] == \
        "teacher_backbone_weights"
    for name in ("teacher", "afp", "msad", "lr-baseline"):
        fingerprint = tasks[name]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
        assert fingerprint["producerTask"] == "prepare-data"


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
    assert source_version == {"outputParameterKey": "Output", "producerTask": "source-version"}
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

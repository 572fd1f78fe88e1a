"""TorchX components: the Volcano job they render for Kubernetes, and real runs on local_cwd."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.specs.finder import get_component
from torchx.specs.overlays import get_overlay

from components import torchx_apps
from components.stage import find, stages
from kd_lib.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = "components/torchx_apps.py"
#: torchx's local_cwd runs ``torchrun`` from PATH: this environment's, first.
VENV_BIN = str(Path(sys.executable).parent)
TINY_TEACHER = ["--arch", "resnet18", "--epochs", "1", "--batch-size", "8", "--hr-size", "32", "--ratio", "4",
                "--device", "cpu", "--num-workers", "0"]


def torchx(*args: str) -> subprocess.CompletedProcess:
    """The torchx CLI of this environment, run in the repository root."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(VENV_BIN) / "torchx"), *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_stage_app_is_a_valid_torchx_component():
    component = get_component(f"{REPO / COMPONENTS}:stage_app")
    assert component.validation_errors == []
    assert "nproc_per_node" in component.fn.__doc__


@pytest.mark.parametrize("stage", stages())
def test_every_stage_runs_as_a_torchx_app(stage):
    [role] = torchx_apps.stage_app(stage, "--data", "d").roles
    assert role.args[1].endswith(f" -m {find(stage).module} --data d")


def test_stage_app_options():
    role = torchx_apps.stage_app("lr-baseline", "--data", "d", nproc_per_node=2).roles[0]
    assert role.resource.gpu == 2  # one GPU per process unless told otherwise
    assert "-m components.lr_baseline --data d" in role.args[1]
    assert torchx_apps.stage_app("lr_baseline", gpus_per_node=0).roles[0].resource.gpu == 0
    with pytest.raises(ConfigError, match="'stage'.*unknown stage 'common'.*teacher"):
        torchx_apps.stage_app("common")
    with pytest.raises(ConfigError, match="'nproc_per_node'.*evaluate trains nothing and runs as one process"):
        torchx_apps.stage_app("evaluate", nproc_per_node=2)
    with pytest.raises(ConfigError, match="'nnodes'"):
        torchx_apps.stage_app("teacher", nnodes=0)


def test_kubernetes_dryrun_renders_a_volcano_job_of_ddp_nodes():
    done = torchx("run", "-s", "kubernetes", "--dryrun", "--workspace", "", "-cfg",
                  "queue=default,validate_spec=False", f"{COMPONENTS}:stage_app", "--stage", "teacher",
                  "--nnodes", "2", "--nproc_per_node", "4", "--gpus_per_node", "4", "--",
                  "--data", "gs://b/data", "--out", "gs://b/teacher")
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load(done.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "default" and job["metadata"]["name"].startswith("kdp-teacher-")
    tasks = job["spec"]["tasks"]
    assert [task["name"] for task in tasks] == ["teacher-0", "teacher-1"]
    rank0_hosts = ["TORCHX_RANK0_HOST", "VC_TEACHER_0_HOSTS"]
    for task, rank0 in zip(tasks, rank0_hosts):
        assert task["replicas"] == 1 and task["minAvailable"] == 1
        pod = task["template"]["spec"]
        # the pod settings of the KFP tasks (kdp compile's defaults): GCS key, node selector, tolerations
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert {"name": "gcs-credentials", "secret": {"secretName": "gcs-credentials"}} in pod["volumes"]
        assert "dshm" in [volume["name"] for volume in pod["volumes"]]
        [container] = pod["containers"]
        assert container["volumeMounts"] == [{"mountPath": "/dev/shm", "name": "dshm"}, {
            "mountPath": "/var/secrets/gcs", "name": "gcs-credentials", "readOnly": True}]
        assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/gcs/key.json"} in container["env"]
        assert container["image"] == torchx_apps.DEFAULT_IMAGE == "ghcr.io/kd-pipeline/kdp:0.1.0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
        assert container["command"][:2] == ["bash", "-c"]
        command = container["command"][2]
        assert command.startswith("torchrun --rdzv_backend c10d --rdzv_endpoint "
                                  f"${{{rank0}:=localhost}}:29500 ")
        assert "--nnodes 2 --nproc_per_node 4 " in command
        assert command.endswith("-m components.teacher --data gs://b/data --out gs://b/teacher")


def test_pod_settings_can_be_changed_or_turned_off():
    [role] = torchx_apps.stage_app("detection-distill", node_selector="pool=a100", tolerations="gpu=yes:NoExecute",
                                   gcs_secret="kdp-gcs", gcs_secret_key="sa.json").roles
    spec = get_overlay(role, "kubernetes", "V1Pod")["spec"]
    assert spec["nodeSelector"] == {"pool": "a100"} and spec["volumes"][0]["secret"] == {"secretName": "kdp-gcs"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute"}]
    assert role.env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/gcs/sa.json"
    [role] = torchx_apps.stage_app("detection-distill", node_selector="", tolerations="", gcs_secret="").roles
    assert get_overlay(role, "kubernetes", "V1Pod") == {} and "GOOGLE_APPLICATION_CREDENTIALS" not in role.env
    with pytest.raises(ConfigError, match="'tolerations'"):
        torchx_apps.stage_app("detection-distill", tolerations="gpu:Never")


@pytest.fixture
def local_cwd(monkeypatch):
    """Run local_cwd apps from the repository root with this environment's torchrun; put back the
    SIGINT/SIGTERM handlers that torchx's local scheduler replaces in the calling process."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.slow
def test_local_cwd_cli_trains_a_teacher(prepared, tmp_path):
    out = tmp_path / "teacher"
    done = torchx("run", "-s", "local_cwd", f"{COMPONENTS}:stage_app", "--stage", "teacher",
                  "--nproc_per_node", "1", "--gpus_per_node", "0", "--", "--data", prepared, "--out", str(out), *TINY_TEACHER)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "manifest.json").is_file()


@pytest.mark.slow
def test_launch_and_wait_on_local_cwd(prepared, tmp_path, local_cwd):
    out = tmp_path / "teacher"
    torchx_apps.launch_and_wait("teacher", ["--data", prepared, "--out", str(out), *TINY_TEACHER],
                                scheduler="local_cwd", gpus_per_node=0, wait_interval=0.5)
    assert (out / "manifest.json").is_file()
    with pytest.raises(RuntimeError, match=r"^teacher: TorchX app local_cwd://\S+ ended FAILED$"):
        torchx_apps.launch_and_wait("teacher", ["--out", str(tmp_path / "failed")], scheduler="local_cwd",
                                    gpus_per_node=0, wait_interval=0.5)
    assert not (tmp_path / "failed" / "manifest.json").exists()

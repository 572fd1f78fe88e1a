"""The images, built and run (marked ``containers``: `make images`, then `make test-containers`).

Each stage runs in the image of its role as a cluster runs it: as the image's user (uid 1000),
without a network, with the dataset mounted read-only and an output volume. Both pipelines run
under ``kdp run --runner docker`` with every task in its container, and a training stage under
``torchrun`` with two processes inside the train image. kfp.local's DockerRunner has reported
success for a failed container (kubeflow/pipelines#13332), so these tests read the outputs, not
the runner's status. Without a Docker engine or the images the tests skip, and fail under CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.image import IMAGES
from kd_lib.io.manifest import read_manifest
from pipelines import cli
from conftest import require, write_imagefolder

pytestmark = pytest.mark.containers
ROOT = Path(__file__).resolve().parents[1]

CPU, TRAIN = IMAGES["cpu"], IMAGES["train"]
#: a stage's tiny settings: one epoch at 32 px on the CPU
TINY = ["--epochs", "1", "--batch-size", "8", "--hr-size", "32", "--ratio", "4", "--device", "cpu",
        "--num-workers", "0"]


def engine_ready() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "no docker client on PATH"
    if subprocess.run(["docker", "info"], capture_output=True).returncode:
        return False, "no Docker daemon answers (`make images` needs one)"
    missing = [name for name in IMAGES.values()
               if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode]
    return not missing, f"images not built: {', '.join(missing)} (`make images`)"


@pytest.fixture(scope="module", autouse=True)
def engine():
    require(*engine_ready())


def docker(image: str, *args: str, volumes: dict[Path, str] = {}, entrypoint: str | None = None,
           env: dict[str, str] = {}, network: str = "none", check: bool = True) -> subprocess.CompletedProcess:
    """``docker run`` of ``image`` with ``args`` on ``network``, ``volumes`` (host path -> container
    path, ``:ro`` suffix allowed) and ``env``; output captured. ``check``: fail the test on a non-zero exit,
    showing the container's output."""
    command = ["docker", "run", "--rm", "--network", network, "--env", "OMP_NUM_THREADS=1"]
    for name, value in env.items():
        command += ["--env", f"{name}={value}"]
    for host, inside in volumes.items():
        command += ["--volume", f"{host}:{inside}"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    done = subprocess.run([*command, image, *args], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} in {image} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def volume(path: Path) -> Path:
    """``path``, made and given to the images' user (uid 1000), as a cluster's volume is."""
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, 1000, 1000)
    return path


@pytest.mark.parametrize("image", [CPU, TRAIN])
def test_each_image_runs_kdp_and_the_kfp_executor_as_uid_1000_from_its_venv(image):
    done = docker(image, "-c", "import os, sys, kfp.dsl.executor_main, kd_lib, components, pipelines; "
                  "print(os.getuid(), sys.executable, os.access(sys.prefix, os.R_OK | os.X_OK))",
                  entrypoint="python3")
    assert done.stdout.split() == ["1000", "/opt/venv/bin/python3", "True"]
    assert docker(image, "--version").stdout.startswith("kdp ")


KERNELS_CHECK = """
import warnings, torch
from kd_lib.ops import extension, kd_loss
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = extension.load()
names = ("paired_resize", "kd_loss_forward", "kd_loss_backward", "mmd2_forward", "mmd2_backward")
registered = all(hasattr(torch.ops.kd_lib_cuda, n)
                 and torch._C._dispatch_has_kernel_for_dispatch_key(f"kd_lib_cuda::{n}", "CUDA") for n in names)
x = torch.randn(4, 5)
print(loaded, registered, torch.cuda.is_available(), float(kd_loss(x, x, 4.0)), len(caught))
for warning in caught:
    print(warning.message)
"""


def test_the_train_image_finds_its_kernels_and_their_operators_register():
    """The kernels built in the image are found by their tag (nothing is compiled at run time: the
    image has no compiler) and register every CUDA operator; without a GPU the ops on CPU tensors
    are the references."""
    loaded, registered, cuda, loss, warnings = docker(TRAIN, "-c", KERNELS_CHECK, entrypoint="python3").stdout.split()
    assert (loaded, registered, cuda, warnings) == ("True", "True", "False", "0")
    assert abs(float(loss)) < 1e-5


def test_without_its_kernels_the_train_image_falls_back_with_one_warning():
    done = docker(TRAIN, "-c", KERNELS_CHECK, env={"KD_LIB_OPS_DIR": "/tmp/none"}, entrypoint="python3")
    first, *messages = done.stdout.strip().splitlines()
    assert first.split()[0] == "False" and first.split()[-1] == "1", done.stdout
    assert len(messages) == 1 and "using the PyTorch reference ops" in messages[0], messages


def test_the_cpu_image_has_neither_the_kernels_nor_a_compiler():
    done = docker(CPU, "-c", "import os, shutil; print(os.environ.get('KD_LIB_DISABLE_CUDA_OPS'), "
                  "os.path.exists('/opt/kd_lib_ops'), shutil.which('nvcc'), shutil.which('g++'))",
                  entrypoint="python3")
    assert done.stdout.split() == ["1", "False", "None", "None"]


def test_every_classification_stage_runs_in_its_image(tmp_path):
    data = write_imagefolder(tmp_path / "images", classes=3, train=12, val=4, size=32)
    out = volume(tmp_path / "out")
    mounts = {data: "/data:ro", out: "/out"}
    docker(CPU, "stage", "prepare-data", "--source", "/data", "--out", "/out/prepared", volumes=mounts)
    common = ["--data", "/out/prepared", *TINY, "--arch", "resnet18"]
    docker(TRAIN, "stage", "teacher", *common, "--out", "/out/teacher", volumes=mounts)
    docker(TRAIN, "stage", "assistant", *common, "--teacher", "/out/teacher", "--out", "/out/assistant", volumes=mounts)
    docker(TRAIN, "stage", "student", *common, "--assistant", "/out/assistant", "--out", "/out/student",
           volumes=mounts)
    docker(TRAIN, "stage", "lr-baseline", *common, "--out", "/out/lr-baseline", volumes=mounts)
    docker(CPU, "stage", "export", "--model", "/out/student", "--data", "/out/prepared", "--out", "/out/export",
           "--latency-repeats", "1", volumes=mounts)
    docker(CPU, "stage", "evaluate", "--data", "/out/prepared", "--out", "/out/evaluate", "--hr-size", "32",
           "--ratio", "4", "--latency-repeats", "1", "--device", "cpu", "--num-workers", "0",
           "--models", "teacher=/out/teacher,student=/out/student,lr_baseline=/out/lr-baseline",
           "--exports", "student=/out/export", volumes=mounts)
    for stage in ("prepared", "teacher", "assistant", "student", "lr-baseline", "export", "evaluate"):
        assert read_manifest(str(out / stage)), stage
    summary = json.loads((out / "evaluate" / read_manifest(str(out / "evaluate"))["paths"]["summary.json"])
                         .read_text())
    assert [m["name"] for m in summary["models"]] == ["teacher", "student", "lr_baseline"]
    assert {p.stat().st_uid for p in (out / "teacher").rglob("*")} == {1000}


def test_the_detection_stages_run_in_their_images(prepared_detection, tmp_path):
    out = volume(tmp_path / "out")
    mounts = {Path(prepared_detection): "/data:ro", out: "/out"}
    tiny = ["--data", "/data", "--epochs", "1", "--batch-size", "4", "--ratio", "2", "--device", "cpu",
            "--num-workers", "0", "--fpn-channels", "64"]
    docker(TRAIN, "stage", "detector", *tiny, "--backbone", "resnet18", "--out", "/out/teacher", volumes=mounts)
    docker(TRAIN, "stage", "detection-distill", *tiny, "--teacher", "/out/teacher", "--assistant-epochs", "1", "--out", "/out/afp",
           volumes=mounts)
    docker(CPU, "stage", "evaluate", "--data", "/data", "--out", "/out/evaluate", "--ratio", "2",
           "--latency-repeats", "1", "--device", "cpu", "--num-workers", "0",
           "--models", "teacher=/out/teacher,student=/out/afp/student", volumes=mounts)
    assert read_manifest(str(out / "evaluate"))["stage"] == "evaluate"


def test_a_stage_under_torchrun_with_two_processes_in_the_train_image(prepared, tmp_path):
    """The host's network, as a pod's: the rendezvous resolves the container's own host name."""
    out = volume(tmp_path / "out")
    done = docker(TRAIN, "--standalone", "--nproc_per_node", "2", "-m", "components.teacher", "--data", "/data",
                  "--out", "/out/teacher", "--arch", "resnet18", *TINY,
                  volumes={Path(prepared): "/data:ro", out: "/out"}, entrypoint="torchrun", network="host")
    assert read_manifest(str(out / "teacher"))["final"]["epoch"] == 1, done.stderr[-2000:]
    assert done.stderr.count("teacher epoch 1/1:") == 1  # two processes, one publishes


def test_a_stage_as_a_torchx_job_on_local_docker(prepared, tmp_path):
    """TorchX's local_docker scheduler: the job's container of the train image (with the working
    tree on top, TorchX's workspace) runs torchrun with two processes that end on the same weights."""
    work = volume(tmp_path / "work")
    shutil.copytree(prepared, work / "data")
    if os.getuid() == 0:
        for path in work.rglob("*"):
            os.chown(path, 1000, 1000)
    done = subprocess.run([str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_docker",
                           "components/torchx_apps.py:stage_app", "--stage", "teacher", "--nproc_per_node", "2",
                           "--gpus_per_node", "0", "--cpu", "2", "--memMB", "8192", "--mounts",
                           f"type=bind,src={work},dst=/work", "--", "--data", "/work/data", "--out", "/work/teacher",
                           *TINY], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = set(re.findall(r"final parameter digest (\w+)", done.stderr))
    assert len(digests) == 1 and read_manifest(str(work / "teacher"))["final"]["epoch"] == 1, done.stderr[-3000:]


def run_docker_pipeline(command: list[str], out: Path) -> dict:
    assert cli.main([*command, "--runner", "docker", "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def test_kdp_run_runs_every_task_in_its_roles_image(tmp_path, capsys):
    summary = run_docker_pipeline(["run", "--epochs", "3"], tmp_path / "run")
    table = capsys.readouterr().out
    names = [m["name"] for m in summary["models"]]
    assert names == ["teacher", "assistant", "student", "student_onestage", "lr_baseline"]
    classes = 8
    for model in summary["models"]:
        assert model["top1"] > 1.5 / classes, f"{model['name']}: top-1 {model['top1']} is not above chance"
        assert model["name"] in table
    images = summary["images"]
    assert images["teacher"]["image"] == TRAIN and images["evaluate"]["image"] == CPU
    assert images["prepare-data"]["image"] == CPU and all(i["id"].startswith("sha256:") for i in images.values())


def test_kdp_detect_runs_every_task_in_its_roles_image(tmp_path):
    summary = run_docker_pipeline(["detect", "--epochs", "1", "--set", "evaluate.latency_repeats=1"],
                                  tmp_path / "detect")
    assert {m["name"] for m in summary["models"]} >= {"teacher", "lr_baseline"}
    assert {i["image"] for i in summary["images"].values()} == {TRAIN, CPU}


def test_kdp_run_fails_at_once_when_an_image_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(IMAGES, "train", "registry.example/kdp-never-built:0")
    assert cli.main(["run", "--runner", "docker", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registry.example/kdp-never-built:0" in err[0] and "make images" in err[0]
    assert not (tmp_path / "run" / "demo-data").exists()

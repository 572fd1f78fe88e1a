"""The images agree with the project, checked without a Docker engine: the Dockerfile is read as
text. Each role of components/image.py is a target; what the targets copy exists; their Python
and torch pins are pyproject's; the train image builds the kernels on the CUDA of its torch, the
cpu image has no CUDA; both install every stage module and run ``kdp`` as a user. And ``kdp
compile`` puts every task on its role's image."""

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from components import torchx_apps
from components.image import IMAGES
from components.stage import stages
from pipelines.tasks import dag_tasks
from pipelines import cli

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The tasks that run on the CPU image in every pipeline, whatever else joins them.
CPU_TASKS = {"source-version", "prepare-data", "evaluate"}


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction, ``\\`` continuations joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines may sit inside a continuation too
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"Dockerfile: the last instruction ends in a line continuation: {pending!r}"
    return result


@dataclass
class Stage:
    """One ``FROM`` of the Dockerfile: its base (an image or an earlier stage) and instructions."""

    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [arguments for k, arguments in self.steps if k == keyword]

    def copied_from(self) -> set[str]:
        return {flag.split("=", 1)[1] for arguments in self.arguments("COPY") for flag in shlex.split(arguments)
                if flag.startswith("--from=")}


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ``ARG`` defaults (before the first ``FROM``) and the stages, by name, in order."""
    global_args, stages = {}, {}
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages[name] = Stage(name, words[0])
        elif stages:
            stages[next(reversed(stages))].steps.append((keyword, arguments))
        else:
            assert keyword == "ARG", f"Dockerfile: {keyword} before the first FROM"
            name, _, value = arguments.partition("=")
            global_args[name] = value
    return global_args, stages


ARGS, STAGES_OF_DOCKERFILE = parse((ROOT / "Dockerfile").read_text())


def expand(text: str, stage: Stage | None = None) -> str:
    """``text`` with ``${NAME}`` replaced by the ARG defaults (the stage's own over the global ones)."""
    values = dict(ARGS)
    for arguments in stage.arguments("ARG") if stage else []:
        name, sep, value = arguments.partition("=")
        if sep:
            values[name] = value
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def chain(target: str) -> list[Stage]:
    """``target`` and every stage it is built from or copies from."""
    stage = STAGES_OF_DOCKERFILE[target]
    found = [stage]
    for name in sorted({stage.base} | stage.copied_from()):
        if name in STAGES_OF_DOCKERFILE:
            found += [s for s in chain(name) if s not in found]
    return found


def base_images(target: str) -> list[str]:
    """The images (not stages) under ``target``, ARGs expanded."""
    return [expand(s.base) for s in chain(target) if s.base not in STAGES_OF_DOCKERFILE]


def runs(target: str) -> list[tuple[Stage, str]]:
    return [(stage, expand(run, stage)) for stage in chain(target) for run in stage.arguments("RUN")]


def envs(stage: Stage) -> dict[str, str]:
    return {name: value for env in stage.arguments("ENV") for name, _, value in
            (word.partition("=") for word in shlex.split(env))}


def local_sources() -> list[str]:
    """What COPY and ADD take from the build context (not ``--from`` another stage or image)."""
    sources = []
    for stage in STAGES_OF_DOCKERFILE.values():
        for arguments in stage.arguments("COPY") + stage.arguments("ADD"):
            words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            if not any(w.startswith("--from=") for w in words):
                sources += [w for w in words if not w.startswith("--")][:-1]  # the last one is the destination
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (the last matching line wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if pattern and not pattern.startswith("#") and any(
                fnmatch(prefix, pattern.lstrip("!")) for prefix in parents_and_self(path)):
            ignored = not pattern.startswith("!")
    return ignored


def parents_and_self(path: str) -> list[str]:
    parts = Path(path).parts
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def requirement(name: str) -> Requirement:
    """``name``'s requirement in pyproject's dependencies."""
    found = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name]
    assert found, f"pyproject.toml: {name} is not in [project] dependencies"
    return found[0]


def role_requirements() -> list[tuple[Path, Requirement]]:
    """``(file, requirement)`` of every ``containers/<role>/requirements.txt``."""
    lines = [(path, line.split("#")[0].strip()) for path in sorted((ROOT / "containers").glob("*/requirements.txt"))
             for line in path.read_text().splitlines()]
    return [(path, Requirement(text)) for path, text in lines if text]


def test_each_role_is_a_target_and_train_is_the_default():
    for role in IMAGES:
        assert role in STAGES_OF_DOCKERFILE, f"Dockerfile: no target {role!r} (docker build --target {role})"
    assert next(reversed(STAGES_OF_DOCKERFILE)) == "train", "Dockerfile: `docker build .` must build the train image"


def test_copied_paths_exist_and_reach_the_build_context():
    sources = local_sources()
    assert "containers/cpu/requirements.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
        assert not dockerignored(source), f"Dockerfile copies {source}, but .dockerignore leaves it out"


def test_every_base_image_is_pinned_by_tag():
    images = [expand(stage.base) for stage in STAGES_OF_DOCKERFILE.values()
              if stage.base not in STAGES_OF_DOCKERFILE and stage.base != "scratch"]
    assert images
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"Dockerfile: {image} is not pinned by tag"


def test_python_version_is_pyprojects_in_both_images():
    version = ARGS["PYTHON_VERSION"]
    requires = PYPROJECT["project"]["requires-python"]
    # a bare 3.11 installs some 3.11.z: its first release must satisfy requires-python too
    assert SpecifierSet(requires).contains(f"{version}.0"), (
        f"Dockerfile: PYTHON_VERSION {version} does not satisfy pyproject's requires-python {requires}")
    for role in IMAGES:
        text = " ".join(base_images(role) + [run for _, run in runs(role)])
        assert re.search(rf"python[: ]+{re.escape(version)}\b", text) or f"--python {version}" in text, (
            f"Dockerfile: the {role} image's Python is not PYTHON_VERSION")


@pytest.mark.parametrize("name, arg", [("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")])
def test_torch_pins_are_pyprojects(name, arg):
    assert f"=={ARGS[arg]}" == str(requirement(name).specifier), (
        f"Dockerfile: ARG {arg} does not match pyproject's {requirement(name)}")


def torch_index(role: str) -> str:
    """The index the ``role`` image installs torch from, before the project."""
    installs = [(stage, run) for stage, run in runs(role) if re.search(r"\btorch==", run)]
    assert len(installs) == 1, f"Dockerfile: the {role} image installs torch {len(installs)} times"
    [(stage, run)] = installs
    assert f"torch=={ARGS['TORCH_VERSION']}" in run and f"torchvision=={ARGS['TORCHVISION_VERSION']}" in run
    project = [i for i, (_, later) in enumerate(runs(role)) if "--no-build-isolation /src" in later]
    assert project and [r for _, r in runs(role)].index(run) < project[0], (
        f"Dockerfile: the {role} image installs the project before its torch build")
    return re.search(r"--index-url (\S+)", run).group(1)


def test_the_train_image_has_the_torch_build_for_its_cuda_toolkit():
    """nvcc builds the extensions that torch loads: both must be the same CUDA release."""
    major, minor = ARGS["CUDA_VERSION"].split(".")[:2]
    index = torch_index("train")
    assert index.rstrip("/").endswith(f"/cu{major}{minor}"), (
        f"Dockerfile: the train image's torch index {index} is not the one for CUDA {major}.{minor}")
    assert any(image.startswith(f"nvidia/cuda:{ARGS['CUDA_VERSION']}-devel") for image in base_images("train"))


def test_the_cpu_image_has_no_cuda():
    assert torch_index("cpu").rstrip("/").endswith("/whl/cpu"), "Dockerfile: the cpu image's torch is not the CPU build"
    assert not [image for image in base_images("cpu") if "cuda" in image], "Dockerfile: the cpu image is built on CUDA"
    assert not [run for _, run in runs("cpu") if "kd_lib.ops.build" in run]
    assert envs(STAGES_OF_DOCKERFILE["cpu"]).get("KD_LIB_DISABLE_CUDA_OPS") == "1"
    names = {r.name for path, r in role_requirements() if path.parent.name == "cpu"}
    assert {"onnx", "onnxruntime"} <= names and not [n for n in names if "gpu" in n or "cuda" in n], names


def test_role_requirements_are_pinned_as_pyproject_pins_them():
    pins = {r.name: r.specifier for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        pins.update({r.name: r.specifier for r in map(Requirement, extra)})
    for path, req in role_requirements():
        where = path.relative_to(ROOT)
        assert req.specifier, f"{where}: {req.name} is not pinned"
        assert req.name not in pins or req.specifier == pins[req.name], (
            f"{where}: {req} disagrees with pyproject's {req.name}{pins[req.name]}")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_build_requirements_are_installed_before_the_no_isolation_build(role):
    text = " ".join(run for _, run in runs(role))
    assert "--no-build-isolation /src" in text, f"Dockerfile: the {role} image does not install the project"
    for needed in PYPROJECT["build-system"]["requires"]:
        assert f'"{needed}"' in text, f"Dockerfile: the {role} image lacks the build requirement {needed}"


def test_pip_install_brings_kfp_for_the_components():
    """The components are built with ``install_kfp_package=False``: the images must have the SDK,
    which ``pip install`` of the project brings as one of its dependencies."""
    names = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert "kfp" in names, (
        "pyproject.toml: kfp is not in [project] dependencies, so `pip install .` leaves it out of the images")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_each_image_runs_kdp_as_a_user_with_the_venv_first(role):
    target = STAGES_OF_DOCKERFILE[role]
    [entrypoint] = [json.loads(arguments) for arguments in target.arguments("ENTRYPOINT")]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"], (
        f"Dockerfile: the {role} ENTRYPOINT {entrypoint[0]} is not a [project.scripts] entry of pyproject.toml")
    users = target.arguments("USER")
    assert users and users[-1] not in ("root", "0"), f"Dockerfile: the {role} image runs as root"
    venv = envs(target)["PATH"].split(":")[0]
    assert any(c.endswith(f" {venv.removesuffix('/bin')}") for c in target.arguments("COPY")), (
        f"Dockerfile: the {role} image's PATH starts with {venv}, which it does not copy")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_every_stage_module_is_installed_in_both_images(role):
    source = STAGES_OF_DOCKERFILE["source"]
    assert "source" in {s.name for s in chain(role)}, f"Dockerfile: the {role} image does not install the sources"
    copied = set(local_sources())
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for stage, declared in stages().items():
        module = declared.module
        top = module.split(".")[0]
        assert top in copied and any(top in c for c in source.arguments("COPY")), (
            f"{stage}: the Dockerfile does not copy {top}/, home of {module}")
        assert any(fnmatch(top, pattern) for pattern in packages), (
            f"{stage}: pyproject's [tool.setuptools.packages.find] does not install {top}")
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), (
            f"{stage}: {module} is not a module of {top}/")


def test_the_kernels_are_built_in_train_build_and_found_at_run_time():
    """`python -m kd_lib.ops.build` runs in train-build with the KD_LIB_OPS_DIR and the
    TORCH_CUDA_ARCH_LIST that the train stage sets, and the train stage copies the kernels, so the
    train image (which has no nvcc) loads them."""
    from kd_lib.ops import extension

    build, train = STAGES_OF_DOCKERFILE["train-build"], STAGES_OF_DOCKERFILE["train"]
    assert any("python -m kd_lib.ops.build" in run for run in build.arguments("RUN")), "Dockerfile: no kernels"
    directory = envs(build)[extension.DIRECTORY_VARIABLE]
    assert envs(train)[extension.DIRECTORY_VARIABLE] == directory
    assert f"--from=train-build {directory} {directory}" in train.arguments("COPY")
    assert envs(build)["TORCH_CUDA_ARCH_LIST"] == extension.DEFAULT_ARCH_LIST
    # the arch list is part of the kernels' tag: at run time on a GPU it must still name the build's
    assert envs(train)["TORCH_CUDA_ARCH_LIST"] == envs(build)["TORCH_CUDA_ARCH_LIST"]


def test_the_cuda_sources_are_package_data():
    """A non-editable install (the image's) must carry every source the extension compiles."""
    from kd_lib.ops import extension

    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["kd_lib.ops"]
    package = extension.SOURCE_DIR.parent
    for source in extension.sources():
        relative = source.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in globs), (
            f"pyproject.toml: [tool.setuptools.package-data] leaves out {relative}")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_each_image_is_registry_name_and_the_projects_version(role):
    match = re.fullmatch(r"(?P<registry>[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?)/(?P<name>[a-z0-9]+([._/-][a-z0-9]+)*)"
                         r":(?P<tag>\w[\w.-]{0,127})", IMAGES[role])
    assert match, f"components/image.py: the {role} image {IMAGES[role]!r} is not REGISTRY/NAME:TAG"
    assert match["tag"] == PYPROJECT["project"]["version"], (
        f"the {role} image is tagged {match['tag']}, but the project is version {PYPROJECT['project']['version']}")
    assert len(set(IMAGES.values())) == len(IMAGES)


def task_images(path: Path) -> dict[str, tuple[str, bool]]:
    """Task display name -> (its image, whether it asks for a GPU), from a compiled pipeline."""
    spec = next(yaml.safe_load_all(path.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    result = {}
    for _, task in dag_tasks(spec, spec["root"]):  # those inside conditions too
        container = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]["container"]
        result[task["taskInfo"]["name"]] = (container["image"], "accelerator" in container.get("resources", {}))
    return result


@pytest.mark.parametrize("pipeline", sorted(cli.PIPELINES))
def test_every_task_of_the_checked_in_yaml_names_its_roles_image(pipeline):
    """A task that trains in its pod (it asks for the GPUs) runs the train image; every other
    task (source-version, prepare-data, evaluate, ...) the cpu image."""
    tasks = task_images(ROOT / cli.PIPELINES[pipeline][1])
    for name, (image, gpu) in tasks.items():
        assert image == IMAGES["train" if gpu else "cpu"], f"{pipeline}: {name} runs {image}"
    assert CPU_TASKS <= {name for name, (_, gpu) in tasks.items() if not gpu}
    assert {name for name, (_, gpu) in tasks.items() if gpu}, f"{pipeline}: no task trains"


def test_kdp_compile_image_flags(tmp_path):
    path = tmp_path / "p.yaml"
    base = ["compile", "--pipeline", "detection", "-o", str(path)]
    assert cli.main([*base, "--image", "registry.example/kdp:2.0"]) == 0
    assert {image for image, _ in task_images(path).values()} == {"registry.example/kdp:2.0"}
    assert cli.main([*base, "--image", "registry.example/kdp:2.0", "--image-cpu", "registry.example/slim:2.0"]) == 0
    tasks = task_images(path)
    assert {tasks[name][0] for name in CPU_TASKS} == {"registry.example/slim:2.0"}
    assert tasks["teacher"][0] == "registry.example/kdp:2.0"


def test_with_torchx_the_jobs_run_the_train_image_and_the_tasks_that_wait_the_cpu_image(tmp_path):
    path = tmp_path / "p.yaml"
    assert cli.main(["compile", "-o", str(path), "--launcher", "torchx", "--image-train", "registry.example/gpu:1",
                     "--image-cpu", "registry.example/cpu:1"]) == 0
    assert {image for image, _ in task_images(path).values()} == {"registry.example/cpu:1"}
    spec = next(yaml.safe_load_all(path.read_text()))
    launchers = [task["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"]
                 for task in spec["root"]["dag"]["tasks"].values() if "launcher" in task["inputs"]["parameters"]]
    assert launchers and {launcher["image"] for launcher in launchers} == {"registry.example/gpu:1"}
    assert torchx_apps.DEFAULT_IMAGE == IMAGES["train"]
    assert torchx_apps.stage_app("evaluate", "--out", "x").roles[0].image == IMAGES["train"]


def test_kdp_compile_refuses_an_empty_image(tmp_path, capsys):
    assert cli.main(["compile", "-o", str(tmp_path / "p.yaml"), "--image-cpu", ""]) == 2
    assert "field 'image_cpu'" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()

"""The images agree with the project, checked without a Docker engine: the Dockerfile is read as
text. Each role of components/image.py is a target; what the targets copy exists; both install
the hashed lock files, which hold pyproject's pins; the train image builds the kernels with the
CUDA compiler of its torch's CUDA, the cpu image has none; both install every stage module and
run ``kdp`` as a user. And ``kdp compile`` puts every task on its role's image. The images
themselves, built and run, are tests/test_images.py's."""

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
from packaging.utils import canonicalize_name

from components import torchx_apps
from components.image import IMAGES
from components.stage import stages
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


def locked(path: Path) -> dict[str, str]:
    """Each pin of a lock file: normalized name -> version."""
    return {canonicalize_name(name): version
            for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\$", path.read_text(), re.MULTILINE)}


def test_each_role_is_a_target_and_train_is_the_default():
    for role in IMAGES:
        assert role in STAGES_OF_DOCKERFILE, f"Dockerfile: no target {role!r} (docker build --target {role})"
    assert next(reversed(STAGES_OF_DOCKERFILE)) == "train", "Dockerfile: `docker build .` must build the train image"


def test_copied_paths_exist_and_reach_the_build_context():
    sources = local_sources()
    assert {"requirements/run.lock", "requirements/kernels.lock"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
        assert not dockerignored(source), f"Dockerfile copies {source}, but .dockerignore leaves it out"


def test_every_base_image_is_pinned_by_tag_and_both_roles_share_it():
    images = {expand(stage.base) for stage in STAGES_OF_DOCKERFILE.values() if stage.base not in STAGES_OF_DOCKERFILE}
    assert len(images) == 1, f"Dockerfile: more than one base image: {images}"
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"Dockerfile: {image} is not pinned by tag"
    python = re.match(r"python:(\d+\.\d+)", image)
    requires = PYPROJECT["project"]["requires-python"]
    assert python and SpecifierSet(requires).contains(f"{python[1]}.0"), (
        f"Dockerfile: {image}'s Python does not satisfy pyproject's requires-python {requires}")


@pytest.mark.parametrize("lock", ["run", "kernels", "dev"])
def test_the_locks_hold_pyprojects_pins_with_hashes(lock):
    """Every dependency of pyproject (and of the extras the lock is for) is pinned in the lock at a
    version its specifier admits, every pin with a hash: ``make lock`` is current."""
    path = ROOT / "requirements" / f"{lock}.lock"
    pins = locked(path)
    extras = {"run": [], "kernels": ["kernels"], "dev": ["test", "docs"]}[lock]
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        wanted += [r for r in PYPROJECT["project"]["optional-dependencies"][extra] if not r.startswith("kd-pipeline")]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{path.name}: {requirement} is not locked; run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{path.name}: {name}=={pins[name]} is not {requirement}; run `make lock`")
    blocks = re.split(r"\n(?=\S)", path.read_text())
    unhashed = [block.split()[0] for block in blocks if "==" in block.split("\n")[0] and "--hash=sha256:" not in block]
    assert not unhashed, f"{path.name}: pinned without a hash: {unhashed}"
    assert locked(ROOT / "requirements" / "run.lock").items() <= pins.items(), (
        f"{path.name} disagrees with run.lock; run `make lock`")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_each_image_installs_the_run_lock_with_hashes_and_the_project_without_dependencies(role):
    text = " ".join(run for _, run in runs(role))
    assert "--require-hashes" in text and "-r /tmp/run.lock" in text, f"Dockerfile: {role} skips run.lock"
    assert "--no-deps --no-build-isolation /src" in text, f"Dockerfile: {role} installs the project's dependencies twice"
    assert "setuptools" in locked(ROOT / "requirements" / "run.lock"), "run.lock lacks setuptools, which builds /src"


def test_only_the_train_image_has_the_kernels_and_neither_has_the_compiler():
    assert envs(STAGES_OF_DOCKERFILE["cpu"]).get("KD_LIB_DISABLE_CUDA_OPS") == "1"
    assert "kernels-build" not in {s.name for s in chain("cpu")}
    for role in IMAGES:
        final = [s for s in chain(role) if s.name in (role, "runtime")]
        assert not [a for s in final for a in s.arguments("RUN") if "kernels.lock" in a or "g++" in a], (
            f"Dockerfile: the {role} image holds the compiler")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_each_image_runs_kdp_as_a_user_with_the_venv_first(role):
    target = STAGES_OF_DOCKERFILE["runtime"]
    assert target in chain(role), f"Dockerfile: the {role} image is not built on the runtime stage"
    [entrypoint] = [json.loads(arguments) for arguments in target.arguments("ENTRYPOINT")]
    assert f"containers/entrypoint.sh /usr/local/bin/{entrypoint[0]}" in target.arguments("COPY"), (
        f"Dockerfile: the {role} ENTRYPOINT {entrypoint[0]} is not containers/entrypoint.sh")
    assert "exec kdp " in (ROOT / "containers" / "entrypoint.sh").read_text()
    assert "kdp" in PYPROJECT["project"]["scripts"]
    users = target.arguments("USER")
    assert users and users[-1] not in ("root", "0"), f"Dockerfile: the {role} image runs as root"
    venv = envs(target)["PATH"].split(":")[0]
    assert any(c.endswith(f" {venv.removesuffix('/bin')}") for c in target.arguments("COPY")), (
        f"Dockerfile: the {role} image's PATH starts with {venv}, which it does not copy")


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_every_stage_module_is_installed_in_both_images(role):
    source = STAGES_OF_DOCKERFILE["runtime"]
    assert "runtime" in {s.name for s in chain(role)}, f"Dockerfile: the {role} image does not install the sources"
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
    """`python -m kd_lib.ops.build` runs in kernels-build with the KD_LIB_OPS_DIR and the
    TORCH_CUDA_ARCH_LIST that the train stage sets, and the train stage copies the kernels, so the
    train image (which has no nvcc) loads them."""
    from kd_lib.ops import extension

    build, train = STAGES_OF_DOCKERFILE["kernels-build"], STAGES_OF_DOCKERFILE["train"]
    assert any("python -m kd_lib.ops.build" in run for run in build.arguments("RUN")), "Dockerfile: no kernels"
    directory = envs(build)[extension.DIRECTORY_VARIABLE]
    assert envs(train)[extension.DIRECTORY_VARIABLE] == directory
    assert f"--from=kernels-build {directory} {directory}" in train.arguments("COPY")
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
    dags = [spec["root"]["dag"], *(component["dag"] for component in spec["components"].values() if "dag" in component)]
    for task in (task for dag in dags for task in dag["tasks"].values()  # those inside conditions too
                 if "executorLabel" in spec["components"][task["componentRef"]["name"]]):
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
    summary = cli.PIPELINES[pipeline][0].summary_task.name
    assert {"source-version", "prepare-data", summary} <= {name for name, (_, gpu) in tasks.items() if not gpu}
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


def test_the_docker_runner_without_a_daemon_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    assert cli.main(["run", "--runner", "docker", "--out", str(tmp_path / "run")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"unix://{tmp_path}/no-daemon.sock" in line and "dockerd" in line
    assert not (tmp_path / "run").exists()  # nothing made, not even the demo data

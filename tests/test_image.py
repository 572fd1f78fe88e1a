"""The Dockerfile agrees with the project: what it copies exists, its Python and torch pins are
pyproject's, its entrypoint is the ``kdp`` script, and the stages the KFP components run are in
the packages it installs. No Docker needed: the Dockerfile is read as text."""

import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from components.image import DEFAULT_IMAGE
from components.stage import stages

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


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


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())


def arg_defaults() -> dict[str, str]:
    """``ARG NAME=VALUE`` defaults; a name declared twice must keep one value."""
    defaults: dict[str, str] = {}
    for keyword, arguments in DOCKERFILE:
        if keyword == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            assert defaults.setdefault(name, value) == value, f"Dockerfile: ARG {name} has two defaults"
    return defaults


def local_sources() -> list[str]:
    """What COPY and ADD take from the build context (not ``--from`` another stage or image)."""
    sources = []
    for keyword, arguments in DOCKERFILE:
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
        flags = [w for w in words if w.startswith("--")]
        if not any(flag.startswith("--from=") for flag in flags):
            sources += [w for w in words if not w.startswith("--")][:-1]  # the last one is the destination
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (the last matching line wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if pattern and not pattern.startswith("#") and fnmatch(path, pattern.lstrip("!")):
            ignored = not pattern.startswith("!")
    return ignored


def requirement(name: str) -> Requirement:
    """``name``'s requirement in pyproject's dependencies."""
    found = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name]
    assert found, f"pyproject.toml: {name} is not in [project] dependencies"
    return found[0]


def test_copied_paths_exist_and_reach_the_build_context():
    sources = local_sources()
    assert sources, "Dockerfile: copies nothing from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
        assert not dockerignored(source), f"Dockerfile copies {source}, but .dockerignore leaves it out"


def test_python_version_is_pyprojects():
    version = arg_defaults()["PYTHON_VERSION"]
    requires = PYPROJECT["project"]["requires-python"]
    # a bare 3.11 installs some 3.11.z: its first release must satisfy requires-python too
    assert SpecifierSet(requires).contains(f"{version}.0"), (
        f"Dockerfile: PYTHON_VERSION {version} does not satisfy pyproject's requires-python {requires}")


@pytest.mark.parametrize("name, arg", [("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")])
def test_torch_pins_are_pyprojects(name, arg):
    assert f"=={arg_defaults()[arg]}" == str(requirement(name).specifier), (
        f"Dockerfile: ARG {arg} does not match pyproject's {requirement(name)}")


def test_torch_index_matches_the_cuda_toolkit():
    """nvcc builds the extensions that torch loads: both must be the same CUDA release."""
    args = arg_defaults()
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{major}{minor}"), (
        f"Dockerfile: TORCH_INDEX_URL {args['TORCH_INDEX_URL']} is not the index for CUDA {major}.{minor}")


def test_build_requirements_are_installed_before_the_no_isolation_build():
    runs = " ".join(arguments for keyword, arguments in DOCKERFILE if keyword == "RUN")
    assert "--no-build-isolation ." in runs, "Dockerfile: the project is not installed without build isolation"
    for needed in PYPROJECT["build-system"]["requires"]:
        assert f'"{needed}"' in runs, f"Dockerfile: does not install the build requirement {needed}"


def test_pip_install_brings_kfp_for_the_components():
    """The components are built with ``install_kfp_package=False``: the image must have the SDK,
    which ``pip install .`` brings as one of the project's dependencies."""
    names = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    assert "kfp" in names, (
        "pyproject.toml: kfp is not in [project] dependencies, so `pip install .` leaves it out of the image; "
        "install it in the Dockerfile (`pip install --no-deps kfp==...` is enough at run time)")


def test_entrypoint_is_the_kdp_script():
    [entrypoint] = [json.loads(arguments) for keyword, arguments in DOCKERFILE if keyword == "ENTRYPOINT"]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"], (
        f"Dockerfile: ENTRYPOINT {entrypoint[0]} is not a [project.scripts] entry of pyproject.toml")


def test_the_image_runs_as_a_user():
    users = [arguments for keyword, arguments in DOCKERFILE if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "Dockerfile: the image runs as root"


def test_every_kfp_stage_is_in_the_installed_packages():
    copied = set(local_sources())
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for stage, declared in stages().items():
        module = declared.module
        top = module.split(".")[0]
        assert top in copied, f"{stage}: the Dockerfile does not copy {top}/, home of {module}"
        assert any(fnmatch(top, pattern) for pattern in packages), (
            f"{stage}: pyproject's [tool.setuptools.packages.find] does not install {top}")


def test_default_image_is_registry_name_and_tag():
    match = re.fullmatch(r"(?P<registry>[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?)/(?P<name>[a-z0-9]+([._/-][a-z0-9]+)*)"
                         r":(?P<tag>\w[\w.-]{0,127})", DEFAULT_IMAGE)
    assert match, f"components/image.py: DEFAULT_IMAGE {DEFAULT_IMAGE!r} is not REGISTRY/NAME:TAG"
    assert match["tag"] == PYPROJECT["project"]["version"], (
        f"DEFAULT_IMAGE is tagged {match['tag']}, but the project is version {PYPROJECT['project']['version']}")


def test_the_kernels_are_built_in_the_build_stage_and_found_at_run_time():
    """`python -m kd_lib.ops.build` runs in the build stage with the KD_LIB_OPS_DIR that the
    runtime stage sets and copies, so the runtime (which has no nvcc) loads the kernels."""
    from kd_lib.ops import extension

    runs = [arguments for keyword, arguments in DOCKERFILE if keyword == "RUN"]
    assert any("python -m kd_lib.ops.build" in run for run in runs), "Dockerfile: the kernels are never built"
    envs = [arguments for keyword, arguments in DOCKERFILE if keyword == "ENV"]
    directories = {value for env in envs for name, _, value in
                   (word.partition("=") for word in shlex.split(env)) if name == extension.DIRECTORY_VARIABLE}
    assert len(directories) == 1, f"Dockerfile: {extension.DIRECTORY_VARIABLE} must be set to one folder in both stages"
    [directory] = directories
    assert sum(env.count(f"{extension.DIRECTORY_VARIABLE}=") for env in envs) == 2
    copies = [arguments for keyword, arguments in DOCKERFILE if keyword == "COPY"]
    assert f"--from=build {directory} {directory}" in copies, f"Dockerfile: the runtime stage lacks {directory}"


def test_the_cuda_sources_are_package_data():
    """A non-editable install (the image's) must carry every source the extension compiles."""
    from kd_lib.ops import extension

    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["kd_lib.ops"]
    package = extension.SOURCE_DIR.parent
    for source in extension.sources():
        relative = source.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in globs), (
            f"pyproject.toml: [tool.setuptools.package-data] leaves out {relative}")

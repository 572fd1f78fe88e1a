"""Run the KFP pipeline on this machine with ``kfp.local``.

The very pipeline that is compiled for a cluster runs here, with one of two
runners: ``subprocess`` (``SubprocessRunner(use_venv=False)``: every
component runs in the current Python environment) or ``docker`` (every task
in the container image of its role: :mod:`pipelines.docker_runner`).
Artifacts live under ``OUT/pipeline_root``, and the local
cache (``OUT/pipeline_root/.kfp_cache``) makes a second run with the same
inputs retrain nothing. Checkpoints go to ``OUT/checkpoints``, keyed by stage
inputs, so a run that was stopped resumes where it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import uuid
import warnings
from pathlib import Path

from kfp import local

from kd_lib.io.manifest import read_manifest, read_published

RESULT_FILES = ("summary.json", "report.html", "report.png")
#: copied too when the summary task published them (a sweep's camera.png)
OPTIONAL_RESULT_FILES = ("camera.png",)
#: what the export stage writes for the device, copied to ``OUT/model/`` (:func:`publish_model`)
MODEL_FILES = ("model.onnx", "model.int8.onnx", "model.json")
RUNNERS = ("subprocess", "docker")
#: The colour codes ``kfp.local`` puts around task names, and a stage's one-line failure (kd_lib.errors).
ANSI_CODE, STAGE_ERROR = re.compile(r"\x1b\[[0-9;]*m"), re.compile(r"kdp [\w -]+: error: ")
PACKAGES = ("kd_lib", "components", "pipelines")


def source_fingerprint() -> str:
    """SHA-256 of the project's Python sources (path and content of each file).

    Passed as the pipeline's ``code_version``, so that the local cache, which
    keys tasks on their inputs, reruns the stages after the code changed.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


class ExecutorInputFilter(io.TextIOBase):
    """A stdout that drops the JSON dump of each task's executor input.

    ``kfp.local`` streams every component's output through ``print``; the
    executor logs its whole input (dozens of lines of JSON per task) before
    the stage's own output. The stage logs keep everything else; ``last_error`` is the last stage
    failure line among them (uncoloured), None before one.
    """

    def __init__(self, target):
        self.target, self.skipping, self.pending = target, False, ""
        self.last_error: str | None = None

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if "Got executor_input:" in line:
                self.skipping = True
            elif not self.skipping:
                self.target.write(line + "\n")
                plain = ANSI_CODE.sub("", line).strip()
                if found := STAGE_ERROR.search(plain):
                    self.last_error = plain[found.start():]
            elif line.rstrip() == "    }":  # the dump's closing brace, in kfp's 4-space indent
                self.skipping = False
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def run_pipeline(params: dict, out: str | os.PathLike, pipeline, runner: str = "subprocess") -> dict[str, Path]:
    """Run ``pipeline`` (a built ``dsl.pipeline``, :meth:`pipelines.dag.Pipeline.build`) with ``params``
    on ``runner`` (one of :data:`RUNNERS`) and copy its summary, report and plot into ``out``. With
    ``docker``, the summary also names the image each task ran in (``images``).

    Returns the paths of the copied :data:`RESULT_FILES`, and of ``model`` (the
    exported model's folder, :func:`publish_model`) when the run exported one.
    Raises RuntimeError if a task fails, naming the task and giving its last error line, without
    colour; ConfigError before anything runs when the docker runner cannot run.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {"checkpoint_root": str(out / "checkpoints"), "code_version": source_fingerprint(), **params}
    if runner == "docker":
        from pipelines.docker_runner import docker_runner

        task_runner = docker_runner(out, params)
    else:
        task_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=task_runner, pipeline_root=str(out / "pipeline_root"), enable_caching=True,
               raise_on_error=True)
    log = ExecutorInputFilter(sys.stdout)
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            result = pipeline(**params)
        except RuntimeError as err:  # kfp.local's "... Inner task failed: 'TASK'.", in colour
            failed = ANSI_CODE.sub("", str(err)).rpartition("Inner task failed: ")[2].rstrip(".")
            raise RuntimeError(f"task {failed} failed: {log.last_error or 'see its log above'}") from None
    summary_dir = result.output  # the summary folder's URI (a parameter: kfp.local picks one of two branches')
    paths = {}
    published = read_manifest(summary_dir)
    for name in (*RESULT_FILES, *(name for name in OPTIONAL_RESULT_FILES if name in published["files"])):
        paths[name] = out / name
        paths[name].write_bytes(read_published(summary_dir, name, published))
    summary = json.loads(paths["summary.json"].read_text())  # a summary that does not parse is a failed run
    exported = [found["export"]["uri"] for found in (summary, *summary.get("models", []))
                if "uri" in found.get("export", {})]
    if exported:
        paths["model"] = publish_model(exported[0], out)
    if runner == "docker":
        from pipelines.docker_runner import task_images

        summary["images"] = task_images(pipeline)
        paths["summary.json"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def publish_model(export_uri: str, out: Path) -> Path:
    """Copy the export stage's device files (:data:`MODEL_FILES`) from ``export_uri`` to ``out/model/``.

    ``out/model`` is a link to a folder ``out/model-v-<token>/`` that holds a whole copy: the files
    are written into a new folder, the link is switched to it in one rename, and only then is the
    copy it replaced removed. So ``out/model/model.onnx`` is a stable path, and a reader never
    sees a half-written or mixed copy there. Returns ``out/model``.
    """
    version = out / f"model-v-{uuid.uuid4().hex[:12]}"
    version.mkdir()
    for name in MODEL_FILES:
        (version / name).write_bytes(read_published(export_uri, name))
    link, staged = out / "model", out / f".model-{version.name}"
    replaced = link.resolve() if link.is_symlink() else None
    staged.symlink_to(version.name)
    os.replace(staged, link)
    if replaced is not None and replaced != version.resolve():
        shutil.rmtree(replaced, ignore_errors=True)
    return link

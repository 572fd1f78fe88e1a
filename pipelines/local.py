"""Run the KFP pipeline on this machine with ``kfp.local``.

The very pipeline that is compiled for a cluster runs here with the
``SubprocessRunner(use_venv=False)``: every component runs in the current
Python environment, artifacts live under ``OUT/pipeline_root``, and the local
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
import sys
import warnings
from pathlib import Path

from kfp import local

from kd_lib.io.manifest import read_published
from pipelines import pixel_distillation

RESULT_FILES = ("summary.json", "report.html")
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
    the stage's own output. The stage logs keep everything else.
    """

    def __init__(self, target):
        self.target, self.skipping, self.pending = target, False, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if "Got executor_input:" in line:
                self.skipping = True
            elif not self.skipping:
                self.target.write(line + "\n")
            elif line.rstrip() == "    }":  # the dump's closing brace, in kfp's 4-space indent
                self.skipping = False
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def run_pipeline(params: dict, out: str | os.PathLike, pipeline=None) -> dict[str, Path]:
    """Run ``pipeline`` (a ``dsl.pipeline``; None: the classification pipeline) with ``params``
    and copy its summary and report into ``out``.

    Returns the paths of the copied ``summary.json`` and ``report.html``.
    Raises RuntimeError if a task fails (its error is in the log above).
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "pipeline_root"),
               enable_caching=True, raise_on_error=True)
    params = {"checkpoint_root": str(out / "checkpoints"), "code_version": source_fingerprint(), **params}
    with warnings.catch_warnings(), contextlib.redirect_stdout(ExecutorInputFilter(sys.stdout)):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        result = (pipeline or pixel_distillation.build_pipeline())(**params)
    # the classification pipeline returns the summary folder's URI (a parameter: kfp.local picks one of
    # two conditional branches' parameters, not artifacts), the detection pipeline the summary artifact
    summary_dir = result.output if isinstance(result.output, str) else result.output.uri
    paths = {}
    for name in RESULT_FILES:
        paths[name] = out / name
        paths[name].write_bytes(read_published(summary_dir, name))
    json.loads(paths["summary.json"].read_text())  # a summary that does not parse is a failed run
    return paths

"""The two images, measured: their size and how long a task takes to start in each.

- size: ``docker image inspect``'s ``Size`` (the uncompressed layers, the base
  included), checked against :data:`LIMIT_BYTES`, and the part the two images
  share (the base, the locked dependencies and the project: a node pulls it
  once for both);
- start-up: from ``docker run`` to the stage's first log line, for a real
  stage on a tiny dataset: prepare-data in the cpu image, the teacher in the
  train image (the median of ``--repeats`` runs). This is what every KFP task
  pays before it does any work: the container start and the imports of torch
  and the project.

Exits 1 when an image is over the limit.
Writes ``bench/results/containers.{json,md}``::

    python bench/containers.py              # after `make images`; about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from components.image import IMAGES  # noqa: E402
from conftest import write_imagefolder  # noqa: E402

#: the most an image may weigh, uncompressed (torch's CUDA build and its NVIDIA libraries are about
#: 6 GB of each, and the same 6 GB in both)
LIMIT_BYTES = 7.5e9
RESULTS = ROOT / "bench" / "results"


def history(name: str) -> dict[str, int]:
    """The image's build steps that have an ID here -> the bytes each added."""
    lines = subprocess.check_output(["docker", "history", "--no-trunc", "--human=false", "--format",
                                     "{{.ID}}\t{{.Size}}", name], text=True).split("\n")
    return {step: int(size) for step, size in (line.split("\t") for line in lines if line)
            if step != "<missing>"}


def image_size(name: str) -> int:
    return int(subprocess.check_output(["docker", "image", "inspect", "-f", "{{.Size}}", name]))


def startup_seconds(image: str, args: list[str], volumes: dict[Path, str]) -> float:
    """Seconds from ``docker run`` to the first line the stage logs (its standard error)."""
    command = ["docker", "run", "--rm", "--network", "none", "--env", "OMP_NUM_THREADS=1"]
    for host, inside in volumes.items():
        command += ["--volume", f"{host}:{inside}"]
    start = time.perf_counter()
    process = subprocess.Popen([*command, image, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = process.stderr.readline()
    seconds = time.perf_counter() - start
    process.communicate()
    if process.returncode or not first:
        raise SystemExit(f"{image} {' '.join(args)}: exited {process.returncode}")
    return seconds


def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_imagefolder(tmp / "images", classes=3, train=12, val=4, size=32)
        out = tmp / "out"
        out.mkdir()
        os.chmod(out, 0o777)  # the images' user (uid 1000) writes there
        volumes = {data: "/data:ro", out: "/out"}
        subprocess.run(["docker", "run", "--rm", "--network", "none", "--volume", f"{data}:/data:ro", "--volume",
                        f"{out}:/out", IMAGES["cpu"], "stage", "prepare-data", "--source", "/data", "--out",
                        "/out/prepared"], check=True, capture_output=True)
        tasks = {"cpu": ["stage", "prepare-data", "--source", "/data", "--out", "/out/again", "--force"],
                 "train": ["stage", "teacher", "--data", "/out/prepared", "--out", "/out/teacher", "--arch", "resnet18",
                           "--epochs", "1", "--batch-size", "8", "--hr-size", "32", "--device", "cpu", "--num-workers", "0",
                           "--restart"]}
        result = {"images": {}, "repeats": repeats}
        for role, name in IMAGES.items():
            times = [startup_seconds(name, tasks[role], volumes) for _ in range(repeats)]
            result["images"][role] = {"image": name, "bytes": image_size(name), "limit_bytes": LIMIT_BYTES,
                                      "startup_s": statistics.median(times), "startup_runs_s": times,
                                      "task": " ".join(tasks[role][:2])}
    cpu, train = history(IMAGES["cpu"]), history(IMAGES["train"])
    result["shared_bytes"] = sum(cpu[step] for step in cpu.keys() & train.keys())
    return result


def markdown(result: dict, commit: str) -> str:
    lines = [f"`python bench/containers.py` at {commit}", "",
             "| image | role | size (GB) | limit (GB) | start-up to first log line (s) | task |",
             "|---|---|---:|---:|---:|---|"]
    for role, row in result["images"].items():
        lines.append(f"| `{row['image']}` | {role} | {row['bytes'] / 1e9:.2f} | {row['limit_bytes'] / 1e9:.1f} | "
                     f"{row['startup_s']:.1f} | {row['task']} |")
    lines += ["", f"Start-up: the median of {result['repeats']} runs, from `docker run` to the stage's first line on "
              f"standard error. The two images share {result['shared_bytes'] / 1e9:.2f} GB of layers (the base, "
              "the locked dependencies and the project), which a node pulls once for both."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.repeats)
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    result["commit"] = commit
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "containers.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, commit)
    (RESULTS / "containers.md").write_text(text)
    print(text)
    over = [role for role, row in result["images"].items() if row["bytes"] > row["limit_bytes"]]
    if over:
        print(f"over the size limit: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

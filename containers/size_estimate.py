"""An estimate of each image's virtual environment, from the one installed here (no Docker engine).

    python containers/size_estimate.py

train: the project's dependencies as installed (torch's CUDA build with its nvidia-* libraries
and triton). cpu: the same without the CUDA-only distributions (nvidia-*, cuda-*, triton) and
torch's CUDA libraries (``torch/lib/*cuda*``, ``*nvshmem*``, ``*nvrtc*``), which torch's CPU
build leaves out, plus ``containers/cpu/requirements.txt``. Sizes are of the installed files,
what the layer holds before compression; the base image and the interpreter are not counted.
"""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
TORCH_CUDA_LIBRARY = re.compile(r"^torch/lib/.*(cuda|nvshmem|nvrtc)")


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` need, by normalized name, recursively."""
    found, pending = {}, [Requirement(text) for text in requirements]
    while pending:
        req = pending.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in found or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pending += [Requirement(text) for text in found[name].requires or []]
    return found


def size(dist: metadata.Distribution, skip: re.Pattern | None = None) -> int:
    files = [f for f in dist.files or [] if not (skip and skip.search(f.as_posix()))]
    return sum(p.stat().st_size for p in map(dist.locate_file, files) if Path(p).is_file())


def main() -> None:
    train = closure(metadata.distribution("kd-pipeline").requires)
    extra = [line.split("#")[0].strip() for line in (ROOT / "containers/cpu/requirements.txt").read_text().splitlines()]
    cpu = {name: dist for name, dist in train.items() if not CUDA_ONLY.match(name)}
    cpu.update(closure([text for text in extra if text]))
    sizes = {"train": sum(size(d) for d in train.values()),
             "cpu": sum(size(d, TORCH_CUDA_LIBRARY if name == "torch" else None) for name, d in cpu.items())}
    for role, total in sizes.items():
        print(f"{role}: {total / 1e9:.2f} GB in /opt/venv")
    cuda = sum(size(d) for name, d in train.items() if CUDA_ONLY.match(name))
    print(f"of train: {cuda / 1e9:.2f} GB of CUDA-only distributions (nvidia-*, cuda-*, triton)")


if __name__ == "__main__":
    main()

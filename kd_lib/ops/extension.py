"""Finding, building and loading the CUDA extension behind :mod:`kd_lib.ops`.

The extension is one shared library, compiled from ``kd_lib/ops/csrc`` by
:func:`torch.utils.cpp_extension.load`, that registers its kernels as the
``kd_lib_cuda`` operator namespace (``TORCH_LIBRARY``, CUDA dispatch key).
It lives in ``$KD_LIB_OPS_DIR/<tag>/`` (default ``~/.cache/kd_lib/ops``),
``<tag>`` a digest of the sources and of the torch and CUDA versions, so a
library built from other sources or for another torch is never loaded.

- The Docker image builds it ahead of time (``python -m kd_lib.ops.build``)
  and sets ``KD_LIB_OPS_DIR`` to where it put it.
- Elsewhere the first op called on CUDA tensors builds it (about a minute);
  with no CUDA compiler, or when the build fails, a warning says why and the
  ops use their PyTorch references from then on.
- ``KD_LIB_DISABLE_CUDA_OPS=1`` forces the references: nothing is loaded or
  built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

NAME = "kd_lib_ops"
SOURCE_DIR = Path(__file__).parent / "csrc"
DISABLE_VARIABLE = "KD_LIB_DISABLE_CUDA_OPS"
DIRECTORY_VARIABLE = "KD_LIB_OPS_DIR"
#: compute capabilities compiled for when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset:
#: A100 and H100/H200, with PTX for later GPUs
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
#: compiler flags of the C++ and the CUDA sources (part of :func:`tag`)
CXX_FLAGS = ("-O3",)
CUDA_FLAGS = ("-O3", "-lineinfo")
#: where CUDA toolkits install by default, the last place :func:`cuda_home` looks
STANDARD_CUDA_HOME = "/usr/local/cuda"

_loaded: bool | None = None  # None: not tried yet in this process


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be built here; the message says why."""


def disabled() -> bool:
    """Whether ``KD_LIB_DISABLE_CUDA_OPS=1`` forces the PyTorch references."""
    return os.environ.get(DISABLE_VARIABLE, "") == "1"


def sources() -> list[Path]:
    """The extension's C++ and CUDA sources, in a stable order."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".cu", ".h"))


def arch_list() -> str:
    """The compute capabilities to compile for: ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs',
    else :data:`DEFAULT_ARCH_LIST`."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                for i in range(torch.cuda.device_count())}))
    return DEFAULT_ARCH_LIST


def tag() -> str:
    """Digest of the sources, the flags, the compute capabilities and the torch and CUDA versions
    they build against."""
    digest = hashlib.sha256(
        f"{torch.__version__}|{torch.version.cuda}|{CXX_FLAGS}|{CUDA_FLAGS}|{arch_list()}".encode())
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """Where this version of the extension is (or will be) built."""
    root = os.environ.get(DIRECTORY_VARIABLE) or Path.home() / ".cache" / "kd_lib" / "ops"
    return Path(root) / tag()


def library_path() -> Path:
    """The shared library :func:`build` writes and :func:`load` loads."""
    return build_directory() / f"{NAME}.so"


def cuda_home() -> Path:
    """The CUDA toolkit to compile with: ``CUDA_HOME``/``CUDA_PATH``, else the one of ``nvcc`` on PATH.

    Raises:
        ExtensionUnavailable: torch has no CUDA build, or no toolkit with
            ``nvcc`` and ``cuda_runtime.h`` is found.
    """
    if torch.version.cuda is None:
        raise ExtensionUnavailable(f"torch {torch.__version__} is a CPU-only build")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append(STANDARD_CUDA_HOME)
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home)
    raise ExtensionUnavailable(
        "no CUDA compiler found (nvcc with cuda_runtime.h, under CUDA_HOME, CUDA_PATH, the nvcc on "
        f"PATH or /usr/local/cuda); install the CUDA {torch.version.cuda} toolkit or use an image "
        "built with `python -m kd_lib.ops.build`")


def _wheel_include_paths() -> list[str]:
    """Header folders of the NVIDIA wheels torch depends on (cuBLAS, cuSPARSE, ...), which a
    toolkit with only the compiler and runtime lacks."""
    paths = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            paths += [str(p) for p in sorted(nvidia.glob("*/include")) if p.is_dir()]
    return paths


def build(verbose: bool = False) -> Path:
    """Compile the extension into :func:`build_directory` (a no-op when up to date) and load it.

    Compiles for the visible GPUs, or for ``TORCH_CUDA_ARCH_LIST``, or for
    :data:`DEFAULT_ARCH_LIST` when neither is there.

    Raises:
        ExtensionUnavailable: no CUDA compiler (see :func:`cuda_home`).
        RuntimeError: the compilation failed; its output says where.
    """
    global _loaded
    home = cuda_home()
    os.environ["CUDA_HOME"] = str(home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()  # what tag() names
    # ninja, when it came with the venv rather than the system
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(home)  # read at import, maybe before the line above
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=NAME, sources=[str(p) for p in sources() if p.suffix != ".h"],
        extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=list(CUDA_FLAGS),
        extra_include_paths=[str(SOURCE_DIR), *_wheel_include_paths()],
        build_directory=str(directory), is_python_module=False, verbose=verbose)
    _loaded = True  # cpp_extension.load has loaded it
    return library_path()


def load() -> bool:
    """Make the ``kd_lib_cuda`` kernels available; True when they are.

    Loads the built library, building it first when absent. False, with one
    warning per process saying why, when the build is impossible or fails;
    False without a word when :func:`disabled`.
    """
    global _loaded
    if disabled():
        return False
    if _loaded is None:
        try:
            if library_path().exists():
                torch.ops.load_library(str(library_path()))
                _loaded = True
            else:
                print(f"kd_lib.ops: compiling the CUDA kernels into {build_directory()} (first use, "
                      "about a minute)", file=sys.stderr, flush=True)
                build()
        except Exception as error:  # any failure leaves the reference ops, which are always correct
            _loaded = False
            warnings.warn(f"kd_lib.ops: CUDA kernels unavailable, using the PyTorch reference ops: "
                          f"{error}", RuntimeWarning, stacklevel=2)
    return bool(_loaded)

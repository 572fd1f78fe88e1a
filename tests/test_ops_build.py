"""The CUDA extension of kd_lib.ops: it compiles with this machine's nvcc, registers its operators,
and is found, rebuilt or skipped as the environment says."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kd_lib.ops import extension

EXPECTED_SCHEMAS = {
    "paired_resize": "kd_lib_cuda::paired_resize(Tensor images, Tensor row_start, Tensor row_weight, "
                     "Tensor col_start, Tensor col_weight, float[] mean, float[] std, ScalarType dtype, "
                     "bool channels_last) -> (Tensor, Tensor)",
    "kd_loss_forward": "kd_lib_cuda::kd_loss_forward(Tensor student, Tensor teacher, float temperature) "
                       "-> (Tensor, Tensor, Tensor)",
    "kd_loss_backward": "kd_lib_cuda::kd_loss_backward(Tensor grad, Tensor student, Tensor teacher, "
                        "Tensor lse_student, Tensor lse_teacher, float temperature) -> Tensor",
    "mmd2_forward": "kd_lib_cuda::mmd2_forward(Tensor x, Tensor y, Tensor bandwidths) -> Tensor",
    "mmd2_backward": "kd_lib_cuda::mmd2_backward(Tensor grad, Tensor x, Tensor y, Tensor bandwidths) "
                     "-> (Tensor, Tensor)",
}


def have_nvcc() -> bool:
    try:
        extension.cuda_home()
    except extension.ExtensionUnavailable:
        return False
    return True


@pytest.mark.requires(have_nvcc(), "no CUDA toolkit (nvcc) on this machine")
def test_extension_compiles_and_registers_its_operators(monkeypatch) -> None:
    """`python -m kd_lib.ops.build` compiles the sources (a compile error fails here) and prints
    the library, which `extension.load()` then finds and loads without building again, and which
    registers every kd_lib_cuda operator for CUDA tensors only. One architecture is enough to catch
    a compile error (the image builds for all of them)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    built = subprocess.run([sys.executable, "-m", "kd_lib.ops.build"], capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    path = Path(built.stdout.strip().splitlines()[-1])
    assert path == extension.library_path() and path.is_file()
    probe = textwrap.dedent(f"""
        import torch
        from kd_lib.ops import extension
        assert extension.load(), "the built library did not load"
        for name in {sorted(EXPECTED_SCHEMAS)!r}:
            print(getattr(torch.ops.kd_lib_cuda, name).default._schema)
        try:
            torch.ops.kd_lib_cuda.kd_loss_forward(torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
        except NotImplementedError as error:
            print("CPU:", str(error).splitlines()[0])
    """)
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert "compiling" not in loaded.stderr
    lines = loaded.stdout.splitlines()
    assert lines[:-1] == [EXPECTED_SCHEMAS[name] for name in sorted(EXPECTED_SCHEMAS)]
    assert "'CPU' backend" in lines[-1]


def test_tag_follows_the_sources_and_the_gpus(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "csrc"
    shutil.copytree(extension.SOURCE_DIR, copy)
    monkeypatch.setattr(extension, "SOURCE_DIR", copy)
    before = extension.tag()
    (copy / "kd_loss.cu").write_text((copy / "kd_loss.cu").read_text() + "\n// changed\n")
    assert extension.tag() != before
    changed = extension.tag()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")  # a build for other GPUs is another build
    assert extension.tag() != changed
    monkeypatch.setenv(extension.DIRECTORY_VARIABLE, str(tmp_path / "ops"))
    assert extension.library_path() == tmp_path / "ops" / extension.tag() / "kd_lib_ops.so"


def test_switch_forces_the_references_without_a_word(monkeypatch, recwarn) -> None:
    monkeypatch.setattr(extension, "_loaded", None)
    monkeypatch.setenv(extension.DISABLE_VARIABLE, "1")
    assert extension.load() is False
    assert extension._loaded is None and not recwarn.list


def test_no_compiler_warns_once_and_keeps_the_references(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(extension, "_loaded", None)
    monkeypatch.delenv(extension.DISABLE_VARIABLE, raising=False)
    monkeypatch.setenv(extension.DIRECTORY_VARIABLE, str(tmp_path))  # nothing built there
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(extension, "STANDARD_CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.warns(RuntimeWarning, match="no CUDA compiler found"):
        assert extension.load() is False
    assert extension.load() is False  # decided once per process: no second warning, no retry


def test_build_command_reports_a_missing_compiler(monkeypatch, capsys) -> None:
    from kd_lib.ops import build

    def missing() -> Path:
        raise extension.ExtensionUnavailable("no CUDA compiler found (test)")

    monkeypatch.setattr(extension, "cuda_home", missing)
    assert build.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no CUDA compiler found" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of a machine without a GPU")
def test_cpu_tensors_never_touch_the_extension(monkeypatch) -> None:
    from kd_lib.ops import kd_loss

    def fail() -> bool:
        raise AssertionError("the extension was asked for on the CPU")

    monkeypatch.setattr(extension, "load", fail)
    assert kd_loss(torch.randn(2, 3), torch.randn(2, 3), 2.0) >= 0

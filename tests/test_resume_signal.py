"""A training stage killed mid-epoch resumes from its last checkpoint when run again (real process, real signal)."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from kd_lib.io.manifest import read_manifest

pytestmark = pytest.mark.slow


def stage_command(data, out):
    return [sys.executable, "-m", "components.teacher", "--data", data, "--out", str(out), "--arch", "resnet18",
            "--epochs", "3", "--batch-size", "4", "--hr-size", "32", "--ratio", "4", "--num-workers", "0",
            "--checkpoint-every", "5"]


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_stage_resumes_and_finishes(prepared, tmp_path, sig):
    out = tmp_path / "teacher"
    process = subprocess.Popen(stage_command(prepared, out), stderr=subprocess.PIPE, text=True)
    checkpoints = out / "checkpoints"
    wait_for(checkpoints, process)
    last = next(iter(checkpoints.iterdir())) / "last.pt"
    wait_for(last, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (128 + sig if sig == signal.SIGTERM else -sig), stderr
    if sig == signal.SIGTERM:
        assert "run the same command again to resume" in stderr
    assert not (out / "manifest.json").exists() and not (out / "model.pt").exists()
    state = torch.load(last, weights_only=True)
    assert state["step"] >= 5 and state["epoch"] < 3
    interrupted_at = (state["epoch"], state["batch"])

    rerun = subprocess.run(stage_command(prepared, out), stderr=subprocess.PIPE, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {last} at epoch {interrupted_at[0] + 1}, batch {interrupted_at[1]}" in rerun.stderr
    manifest = read_manifest(str(out))
    assert manifest["final"]["epoch"] == 3 and manifest["final"]["step"] == 3 * (72 // 4)
    assert not checkpoints.exists()

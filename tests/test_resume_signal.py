"""A training stage killed mid-epoch (real process, real signal) resumes from its last checkpoint when run
again, and publishes the weights of an uninterrupted run, bit for bit (a model with dropout and BatchNorm)."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from kd_lib.io.manifest import read_manifest
from kd_lib.models.store import load_classifier

pytestmark = pytest.mark.slow

STEPS = 3 * (72 // 4)  # three epochs of the prepared fixture's 72 training images, batch 4


def stage_command(data, out):
    return [sys.executable, "-m", "components.teacher", "--data", data, "--out", str(out),
            "--arch", "mobilenet_v3_small", "--epochs", "3", "--batch-size", "4", "--hr-size", "32", "--ratio", "4",
            "--num-workers", "0", "--device", "cpu", "--checkpoint-every", "5"]


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The published weights of the same stage run once without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted") / "teacher"
    run = subprocess.run(stage_command(prepared, out), stderr=subprocess.PIPE, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return load_classifier(str(out))[0].state_dict()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_stage_resumes_and_finishes_as_if_never_stopped(prepared, tmp_path, sig, uninterrupted):
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
    loop = torch.load(last, weights_only=True)["loop"]
    assert 5 <= loop["step"] < STEPS

    rerun = subprocess.run(stage_command(prepared, out), stderr=subprocess.PIPE, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {last} at epoch {loop['epoch'] + 1}, batch {loop['batch']}" in rerun.stderr
    manifest = read_manifest(str(out))
    assert manifest["final"]["epoch"] == 3 and manifest["final"]["step"] == STEPS
    assert not checkpoints.exists()
    torch.testing.assert_close(load_classifier(str(out))[0].state_dict(), uninterrupted, rtol=0, atol=0)

"""One writer per output (issue 36): a stage leases its ``out`` before it works; a second writer fails
within a second naming the holder, and the first one's output is whole. A stale lease (its process gone,
or expired) and the lease of an earlier attempt of the same task are taken over, and logged."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from kd_lib.errors import BusyError
from kd_lib.io.lease import LEASE, TASK_ENV, Lease
from kd_lib.io.manifest import read_manifest
from kd_lib.models.store import load_classifier
from test_gcs import gcs  # noqa: F401 (the fixture)
from test_reliability import FAST, ROOT, assert_failed_cleanly, kdp

HOST = socket.gethostname()


def start_writer(data: str, out: str, env: dict | None = None) -> subprocess.Popen:
    """``kdp stage teacher`` into ``out`` in another process, long enough to be caught at work."""
    return subprocess.Popen([sys.executable, "-m", "pipelines", "stage", "teacher", "--data", data, "--out", out,
                             *FAST, "--epochs", "4"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(exists, first: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not exists():
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "the first writer took no lease"
        time.sleep(0.02)


def second_writer_fails_fast(capsys, first: subprocess.Popen, data: str, out: str) -> None:
    """A second writer into ``out`` while ``first`` writes there fails within a second naming it, and the
    first one publishes a whole output."""
    started = time.monotonic()
    code, err = kdp(capsys, "stage", "teacher", "--data", data, "--out", out, *FAST, "--seed", "1")
    assert time.monotonic() - started < 1, err
    assert_failed_cleanly(code, err, 1, out, f"{HOST} pid {first.pid} since")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    manifest = read_manifest(out)
    assert manifest["stage"] == "teacher" and manifest["config"]["seed"] == 0
    load_classifier(out)


def test_a_second_writer_fails_at_once_naming_the_first(prepared, tmp_path, capsys):
    out = tmp_path / "teacher"
    first = start_writer(prepared, str(out))
    wait_for((out / LEASE).exists, first)
    second_writer_fails_fast(capsys, first, prepared, str(out))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v-")) == [
        read_manifest(str(out))["paths"]["model.pt"].split("/")[0]]  # no other writer's folder
    assert not (out / LEASE).exists()


def test_a_second_writer_fails_at_once_on_gcs(gcs, prepared, capsys):
    gcs.mkdir("out-bucket")
    first = start_writer(prepared, "gs://out-bucket/teacher", {
        "FSSPEC_GS_ENDPOINT_URL": fsspec.config.conf["gs"]["endpoint_url"], "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})

    def leased() -> bool:
        gcs.invalidate_cache()
        return gcs.exists(f"out-bucket/teacher/{LEASE}")

    wait_for(leased, first)
    second_writer_fails_fast(capsys, first, prepared, "gs://out-bucket/teacher")
    gcs.invalidate_cache()
    assert not gcs.exists(f"out-bucket/teacher/{LEASE}")


def write_lease(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00",
                                         "task": "", "token": "t", "expires": time.time() + 300, **holder}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.mark.parametrize("holder, task, why", [
    ({"host": HOST, "pid": None}, "", "its process is gone"),
    ({"expires": 0}, "", "it expired"),
    ({"task": "kfp"}, "kfp", "an earlier attempt of task kfp"),
])
def test_a_stale_or_own_lease_is_taken_over_and_logged(tmp_path, monkeypatch, caplog, holder, task, why):
    write_lease(tmp_path, **{key: dead_pid() if value is None else value for key, value in holder.items()})
    monkeypatch.setenv(TASK_ENV, task)
    with Lease(str(tmp_path)):
        assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
    assert "taking over the lease of" in caplog.text and why in caplog.text
    assert not (tmp_path / LEASE).exists()


def test_a_live_lease_of_another_host_or_task_is_not_taken(tmp_path, monkeypatch):
    write_lease(tmp_path, task="kfp")
    monkeypatch.setenv(TASK_ENV, "")
    with pytest.raises(BusyError, match="elsewhere pid 1 since 2026-01-01"):
        Lease(str(tmp_path)).__enter__()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "t"

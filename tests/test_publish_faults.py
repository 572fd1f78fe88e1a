"""Fault injection: every write of a publication and of a checkpoint fails in turn, on the local disk
and on a GCS server (fake-gcs-server), and at every moment exactly one whole output is published:
its manifest reads, and every file it names is there with the promised size and SHA-256."""

import errno

import pytest
import torch

from kd_lib.errors import DataError
from kd_lib.io import checkpoint
from kd_lib.io.fs import filesystem, join, write_bytes
from kd_lib.io.manifest import MANIFEST, read_manifest, read_published, stored_path
from kd_lib.io.publish import Publication
from test_gcs import gcs  # noqa: F401 - the GCS server fixture


class Faults:
    """Counts the writes (files opened for writing, moves) on a filesystem class, checks ``invariant``
    before each, and fails the ``fail_at``-th with ENOSPC."""

    def __init__(self, monkeypatch, fs, invariant):
        self.count, self.fail_at, self.invariant, self.checks = 0, None, invariant, 0
        cls = type(fs)
        original_open, original_mv = cls.open, cls.mv

        def write_op():
            self.invariant()
            self.checks += 1
            self.count += 1
            if self.count == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

        def open_(fs_self, path, mode="rb", *args, **kwargs):
            if "w" in mode or "a" in mode:
                write_op()
            return original_open(fs_self, path, mode, *args, **kwargs)

        def mv(fs_self, *args, **kwargs):
            write_op()
            return original_mv(fs_self, *args, **kwargs)

        monkeypatch.setattr(cls, "open", open_)
        monkeypatch.setattr(cls, "mv", mv)

    def arm(self, fail_at):
        self.count, self.fail_at = 0, fail_at


def whole(out: str, names=None) -> dict:
    """The manifest at ``out``, after checking every file it names (and its nested outputs' manifests)."""
    manifest = read_manifest(out)
    for name in manifest["files"]:
        read_published(out, name, manifest, check_hash=True)
    for folder in names or ():
        whole(join(out, folder))
    return manifest


def stored_files(out: str) -> set[str]:
    fs, path = filesystem(out)
    return {f[len(path.rstrip("/")) + 1:] for f in fs.find(path)}


@pytest.fixture(params=["local", "gcs"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    fs = request.getfixturevalue("gcs")
    fs.mkdir("bucket")
    return "gs://bucket/out"


def publish(out: str, version: int) -> dict:
    """An output like a detection stage's: two files of its own and two nested detector outputs."""
    with Publication(out, "detection-distill", f"key{version}") as publication:
        for phase in ("assistant", "student"):
            child = publication.child(phase, f"afp-{phase}")
            write_bytes(join(child.folder, "model.pt"), f"{phase} model {version}".encode() * 100)
            child.commit(["model.pt"], {})
        for name in ("metrics.parquet", "model.pt"):
            write_bytes(join(publication.folder, name), f"{name} {version}".encode() * (50 + version))
        return publication.commit(["metrics.parquet", "model.pt"], {"version": version})


def test_each_failed_write_of_a_publication_leaves_one_whole_output(location, monkeypatch):
    first = publish(location, 1)
    fs, _ = filesystem(location)
    faults = Faults(monkeypatch, fs, lambda: whole(location, ("assistant", "student")))
    failures = 0
    for fail_at in range(1, 100):
        faults.arm(fail_at)
        try:
            manifest = publish(location, 2)
        except OSError:
            failures += 1
            assert whole(location, ("assistant", "student"))["version"] in (1, 2)
            continue
        assert faults.count < fail_at  # every write has failed once
        break
    assert failures >= 8 and faults.checks > failures
    assert whole(location, ("assistant", "student"))["version"] == 2 and manifest["version"] == 2
    # re-run: published whole, and nothing left of the first output nor of the failed attempts
    faults.arm(None)
    third = publish(location, 3)
    expected = {MANIFEST, "assistant/manifest.json", "student/manifest.json",
                *(stored_path(third, name) for name in third["files"])}
    assert stored_files(location) == expected
    assert not set(first.get("paths", {}).values()) & stored_files(location)


def test_publishing_over_another_stage_removes_none_of_its_files(tmp_path):
    out = str(tmp_path / "out")
    with Publication(out, "teacher", "k") as publication:
        write_bytes(join(publication.folder, "model.pt"), b"teacher")
        teacher = publication.commit(["model.pt"], {})
    with Publication(out, "prepare-data", "k") as publication:
        write_bytes(join(publication.folder, "train-00000.parquet"), b"shard")
        publication.commit(["train-00000.parquet"], {})
    assert (tmp_path / "out" / teacher["paths"]["model.pt"]).read_bytes() == b"teacher"


def test_each_failed_write_of_a_checkpoint_leaves_one_readable(location, monkeypatch):
    uri = join(location, "ckpt", "last.pt")
    checkpoint.save_latest({"step": torch.tensor(1)}, uri)
    fs, _ = filesystem(location)

    def readable():
        assert int(checkpoint.load_latest(uri)[0]["step"]) in (1, 2)

    faults = Faults(monkeypatch, fs, readable)
    for fail_at in range(1, 20):
        faults.arm(fail_at)
        try:
            checkpoint.save_latest({"step": torch.tensor(2)}, uri)
        except OSError:
            readable()
            continue
        break
    assert fail_at >= 4  # the new file, its move into place, last -> previous, next -> last
    assert int(checkpoint.load_latest(uri)[0]["step"]) == 2
    faults.arm(None)
    faults.invariant = lambda: None
    checkpoint.save_latest({"step": torch.tensor(3)}, uri)
    write_bytes(uri, b"damaged")
    assert int(checkpoint.load_latest(uri)[0]["step"]) == 2  # the previous one
    write_bytes(join(location, "ckpt", "previous.pt"), b"damaged too")
    with pytest.raises(Exception, match="--restart") as err:
        checkpoint.load_latest(uri)
    assert uri in str(err.value)
    assert sorted(checkpoint.discard_damaged(join(location, "ckpt"))) == sorted(
        [uri, join(location, "ckpt", "previous.pt")])
    assert checkpoint.load_latest(uri) is None


def test_reading_checks_sizes_and_hashes(tmp_path):
    out = str(tmp_path / "out")
    with Publication(out, "teacher", "k") as publication:
        write_bytes(join(publication.folder, "model.pt"), b"weights")
        manifest = publication.commit(["model.pt"], {})
    path = tmp_path / "out" / manifest["paths"]["model.pt"]
    path.write_bytes(b"weightz")
    assert read_published(out, "model.pt") == b"weightz"  # same size: only the hash tells
    with pytest.raises(DataError, match=f"{path}: SHA-256 .* promises {manifest['files']['model.pt']}"):
        read_published(out, "model.pt", check_hash=True)
    path.write_bytes(b"w")
    with pytest.raises(DataError, match=f"{path}: 1 bytes, but .* promises 7"):
        read_published(out, "model.pt")

"""Bad input and faults, as a hostile but fair user would cause them: each is an exit status and one or
two lines naming the file, field or URI, never a traceback, and earlier outputs stay as they were
(same manifest, same files, still readable by the next stage)."""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from components import common, teacher
from kd_lib.config import from_dict
from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder
from kd_lib.data.transforms import CropTransform
from kd_lib.errors import DataError, StorageError
from kd_lib.io import checkpoint
from kd_lib.io.manifest import read_manifest
from kd_lib.models.store import load_classifier
from pipelines import cli

FAST = ["--epochs", "1", "--batch-size", "8", "--hr-size", "32", "--ratio", "4", "--num-workers", "0",
        "--arch", "resnet18", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


def kdp(capsys, *argv) -> tuple[int, str]:
    """``kdp ARGV`` in this process: its exit status and its stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` and the SHA-256 of its bytes."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_failed_cleanly(code: int, err: str, expected: int, *named: str) -> None:
    assert code == expected, err
    assert "Traceback" not in err, err
    for name in named:
        assert str(name) in err, err
    assert len(re.findall(r"kdp[\w -]*: (error|interrupted)", err)) == 1, err  # one message


def no_space_for_models(monkeypatch) -> None:
    """Writing a ``model.pt`` (its temporary file) on the local disk fails with ENOSPC."""
    from fsspec.implementations.local import LocalFileSystem

    original = LocalFileSystem.open

    def open_(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and ".model.pt." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "open", open_)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """A prepared 2-class dataset of 4 + 4 train and 2 + 2 val images of 32 px: one batch per epoch."""
    from conftest import write_imagefolder

    root = tmp_path_factory.mktemp("tiny")
    prepare_imagefolder(str(write_imagefolder(root / "src", classes=2, train=4, val=2)), str(root / "data"))
    return str(root / "data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> str:
    """A finished teacher output on the tiny prepared data."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    assert cli.main(["stage", "teacher", "--data", prepared, "--out", str(out), *FAST]) == 0
    return str(out)


@pytest.fixture
def teacher_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "teacher"))


def test_prepare_data_aimed_at_a_teacher_is_refused_and_deletes_nothing(teacher_copy, imagefolder, capsys):
    before = snapshot(teacher_copy)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", imagefolder, "--out", teacher_copy)
    assert_failed_cleanly(code, err, 2, teacher_copy, "'teacher'", "--force")
    assert snapshot(teacher_copy) == before
    load_classifier(str(teacher_copy))
    code, err = kdp(capsys, "stage", "prepare-data", "--source", imagefolder, "--out", teacher_copy, "--force")
    assert code == 0, err
    after = snapshot(teacher_copy)
    assert all(after[name] == digest for name, digest in before.items() if name != "manifest.json")


def test_out_equal_to_the_data_is_refused(prepared, capsys):
    before = snapshot(prepared)
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", prepared + "/", *FAST)
    assert_failed_cleanly(code, err, 2, prepared, "data")
    assert snapshot(prepared) == before
    assert len(ShardedImageDataset(prepared, "val", CropTransform(32, 4, train=False))) == 4


def test_a_failed_rerun_leaves_the_earlier_output_published(prepared, teacher_copy, monkeypatch, capsys):
    before = snapshot(teacher_copy)
    no_space_for_models(monkeypatch)
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", teacher_copy, *FAST, "--seed", "1")
    assert_failed_cleanly(code, err, 1, "No space left on device")
    assert {k: v for k, v in snapshot(teacher_copy).items() if not k.startswith("checkpoints/")} == before
    load_classifier(str(teacher_copy))


def test_a_damaged_checkpoint_falls_back_to_the_previous_then_needs_restart(prepared, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    out, root = tmp_path / "t", tmp_path / "ckpt"
    args = ["stage", "teacher", "--data", prepared, "--out", out, "--checkpoint-root", root, *FAST,
            "--epochs", "2"]

    def fail(*a, **k):
        raise StorageError("cannot write: [Errno 28] No space left on device")

    with monkeypatch.context() as patch:  # trains, then cannot publish: the checkpoints stay
        patch.setattr(common.Publication, "commit", fail)
        assert kdp(capsys, *args)[0] == 1
    [folder] = root.iterdir()
    last, previous = folder / "last.pt", folder / "previous.pt"
    assert last.exists() and previous.exists()
    last.write_bytes(last.read_bytes()[:100])
    code, err = kdp(capsys, *args)
    assert code == 0 and f"resumed from {previous} " in err and f"resumed from {last}" not in err, err
    assert f"{last}: not a readable checkpoint" in caplog.text

    shutil.copytree(out, tmp_path / "published")
    with monkeypatch.context() as patch:
        patch.setattr(common.Publication, "commit", fail)
        assert kdp(capsys, *args, "--seed", "3")[0] == 1
    [folder] = [f for f in root.iterdir() if (f / "last.pt").exists()]
    (folder / "previous.pt").unlink()
    (folder / "last.pt").write_bytes(b"\0" * 64)
    for _ in range(2):  # the same answer each time, not a loop on a raw error
        code, err = kdp(capsys, *args, "--seed", "3")
        assert_failed_cleanly(code, err, 1, folder / "last.pt", "--restart")
    assert snapshot(out) == snapshot(tmp_path / "published")
    code, err = kdp(capsys, *args, "--seed", "3", "--restart")
    assert code == 0, err


def test_a_checkpoint_with_pickled_code_is_refused_without_unsafe_advice(tmp_path):
    uri = str(tmp_path / "last.pt")
    torch.save({"x": Path("/")}, uri)  # a pickled class instance, not a tensor or plain value
    with pytest.raises(DataError, match="refused") as err:
        checkpoint.load(uri)
    assert uri in str(err.value) and "weights_only=False" not in str(err.value)


@pytest.mark.parametrize("weights, named", [("nope.pt", "does not exist"),
                                             ("noise.pt", "not a readable state dict")])
def test_weights_that_are_missing_or_not_weights_are_named(prepared, tmp_path, capsys, weights, named):
    """Named in one line that says what is wrong, never with torch's advice to load unsafely."""
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", tmp_path / "t", *FAST,
                    "--weights", tmp_path / weights)
    assert_failed_cleanly(code, err, 1, tmp_path / weights, named)
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err, err


def test_a_swapped_model_is_named_with_both_hashes(prepared, teacher_copy, tmp_path, capsys):
    manifest = read_manifest(str(teacher_copy))
    model = teacher_copy / manifest["paths"]["model.pt"]
    state = torch.load(model, weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 1
    torch.save(state, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    code, err = kdp(capsys, "stage", "assistant", "--data", prepared, "--out", tmp_path / "a",
                    "--teacher", teacher_copy, *FAST)
    assert_failed_cleanly(code, err, 1, model, digest, manifest["files"]["model.pt"])


@pytest.mark.parametrize("damage", ["truncated model", "corrupt model", "truncated manifest"])
def test_a_damaged_upstream_output_is_named(prepared, teacher_copy, tmp_path, capsys, damage):
    manifest = read_manifest(str(teacher_copy))
    model = teacher_copy / manifest["paths"]["model.pt"]
    if damage == "truncated model":
        model.write_bytes(model.read_bytes()[:1000])
        named = model
    elif damage == "corrupt model":
        model.write_bytes(b"\0" * model.stat().st_size)
        named = model
    else:
        text = (teacher_copy / "manifest.json").read_text()
        (teacher_copy / "manifest.json").write_text(text[:len(text) // 2])
        named = teacher_copy / "manifest.json"
    code, err = kdp(capsys, "stage", "assistant", "--data", prepared, "--out", tmp_path / "a",
                    "--teacher", teacher_copy, *FAST)
    assert_failed_cleanly(code, err, 1, named)


def test_a_truncated_shard_is_named(prepared, tmp_path, capsys):
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    manifest = read_manifest(str(data))
    shard = data / manifest["paths"]["train-00000.parquet"]
    shard.write_bytes(shard.read_bytes()[:500])
    code, err = kdp(capsys, "stage", "teacher", "--data", data, "--out", tmp_path / "t", *FAST)
    assert_failed_cleanly(code, err, 1, shard)


def test_a_detector_given_as_a_classifier_is_named(prepared, tmp_path, capsys):
    from kd_lib.io.publish import Publication
    from kd_lib.models.detector_store import DetectorSpec, save_detector

    spec = DetectorSpec("fcos", "mobilenet_v3_small", 3, 64)
    detector = tmp_path / "detector"
    with Publication(str(detector), "detector", "k") as publication:
        save_detector(publication.folder, spec.build(), spec, ["class0", "class1", "class2"])
        publication.commit(["model.pt"], {})
    code, err = kdp(capsys, "stage", "assistant", "--data", prepared, "--out", tmp_path / "a",
                    "--teacher", detector, *FAST)
    assert_failed_cleanly(code, err, 1, detector, "not a classifier")


def test_detection_data_given_to_the_teacher_is_named(prepared_detection, tmp_path, capsys):
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared_detection, "--out", tmp_path / "t", *FAST)
    assert_failed_cleanly(code, err, 1, prepared_detection, "detection data")


def test_malformed_yaml_is_a_config_error(tmp_path, capsys):
    config = tmp_path / "teacher.yaml"
    config.write_text("epochs: [1\nlr: 0.1\n")
    code, err = kdp(capsys, "stage", "teacher", "--config", config)
    assert_failed_cleanly(code, err, 2, config, "not valid YAML")


@pytest.mark.parametrize("arch", ["resnet19", "timm:resnet19"])
def test_an_unknown_architecture_is_a_config_error_before_data_loads(tmp_path, capsys, arch):
    code, err = kdp(capsys, "stage", "teacher", "--data", tmp_path / "nowhere", "--out", tmp_path / "t",
                    *FAST, "--arch", arch)
    assert_failed_cleanly(code, err, 2, "'arch'", "resnet18")  # named, with close matches


@pytest.mark.parametrize("argument", ["bogus_kw=3", "drop_rate=abc"])
def test_a_timm_argument_the_model_does_not_take_is_a_config_error(tmp_path, capsys, argument):
    """An unknown keyword, or a string for a number, fails the config check in one line, not in training."""
    code, err = kdp(capsys, "stage", "teacher", "--data", tmp_path / "nowhere", "--out", tmp_path / "t",
                    *FAST, "--arch", f"timm:resnet18,{argument}")
    assert_failed_cleanly(code, err, 2, "'arch'", argument.partition("=")[0])
    assert len(err.strip().splitlines()) == 1, err


def test_an_unknown_detector_backbone_is_a_config_error(tmp_path, capsys):
    code, err = kdp(capsys, "stage", "detector", "--data", tmp_path / "nowhere", "--out", tmp_path / "t",
                    "--backbone", "resnet19")
    assert_failed_cleanly(code, err, 2, "'backbone'", "resnet18")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_absent_device_is_a_config_error_before_data_loads(prepared, tmp_path, capsys):
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", tmp_path / "t", *FAST,
                    "--device", "cuda")
    assert_failed_cleanly(code, err, 2, "'device'", "no CUDA device")


def test_a_decompression_bomb_is_named(make_imagefolder, tmp_path, monkeypatch, capsys):
    source = make_imagefolder(tmp_path / "src", classes=2, train=2, val=1, size=32)
    bomb = source / "train" / "class1" / "001.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 32 x 32 = 1024 pixels below it, 64 x 64 above
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d")
    assert_failed_cleanly(code, err, 1, bomb, "decompression bomb")
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_a_yolo_image_that_does_not_decode_is_named(tmp_path, capsys):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cat]\n")
    Image.new("RGB", (64, 64)).save(root / "images" / "train" / "a.png")
    (root / "images" / "train" / "b.png").write_bytes(b"not a png")
    code, err = kdp(capsys, "stage", "prepare-data", "--source", root, "--out", tmp_path / "d", "--image-size", "64")
    assert_failed_cleanly(code, err, 1, root / "images" / "train" / "b.png")


@pytest.mark.parametrize("bbox", [[1, 2, 3], ["1", "2", "3", "4"], None])
def test_a_malformed_coco_bbox_is_named(tmp_path, capsys, bbox):
    from conftest import write_coco

    annotations, images = write_coco(tmp_path / "coco", images=4, size=64)
    data = json.loads(annotations.read_text())
    data["annotations"][1]["bbox"] = bbox
    annotations.write_text(json.dumps(data))
    code, err = kdp(capsys, "stage", "prepare-data", "--source", annotations, "--images", images,
                    "--out", tmp_path / "d", "--image-size", "64")
    assert_failed_cleanly(code, err, 1, annotations, f"annotation {data['annotations'][1]['id']}")


#: ``kdp`` with SIGINT delivered while kfp is being imported, during the start-up imports.
SIGINT_AT_IMPORT = """
import importlib.abc, os, signal, sys
class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kfp":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Interrupt())
from pipelines.__main__ import main
sys.exit(main())
"""


def test_sigint_during_start_up_exits_130_without_a_traceback(prepared, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", SIGINT_AT_IMPORT, "stage", "teacher", "--data", prepared,
                              "--out", str(tmp_path / "t"), *FAST], env=env, stderr=subprocess.PIPE, text=True,
                             timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (SIG_DFL as from a shell: a pytest-xdist worker ignores SIGINT, and an ignored SIGINT is inherited)
    assert process.returncode == 130 and "Traceback" not in process.stderr, process.stderr
    assert "interrupted" in process.stderr and not (tmp_path / "t").exists()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "nonexistent.invalid:4443"], ids=["closed-port", "no-such-host"])
def test_an_unreachable_bucket_fails_within_the_storage_timeout(host, tmp_path, monkeypatch, capsys):
    """Store and metadata server (where gcsfs looks up credentials) at a closed port or an unresolvable
    host: the stage fails in one line naming the URI within the timeout and a second and a half."""
    pytest.importorskip("gcsfs")
    import fsspec
    import gcsfs
    from test_gcs import free_port

    host = host.format(port=free_port())
    for variable in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
        monkeypatch.setenv(variable, host)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"endpoint_url": f"http://{host}"})
    gcsfs.GCSFileSystem.clear_instance_cache()
    timeout = 2
    started = time.monotonic()
    code, err = kdp(capsys, "stage", "teacher", "--data", "gs://nowhere/data", "--out", tmp_path / "t", *FAST,
                    "--storage-timeout", timeout)
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 1.5, f"failed after {elapsed:.1f} s"
    assert_failed_cleanly(code, err, 1, "gs://nowhere/data", "storage_timeout")
    assert len(err.strip().splitlines()) == 1, err
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_an_out_that_cannot_be_written_fails_before_training(prepared, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", blocker, *FAST)
    assert_failed_cleanly(code, err, 2, blocker, "is a file")
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", blocker / "sub", *FAST)
    assert_failed_cleanly(code, err, 1, blocker / "sub")
    assert "epoch" not in err
    assert blocker.read_text() == "a file"


def test_a_checkpoint_root_that_cannot_be_written_fails_at_preflight(prepared, tmp_path, capsys, monkeypatch):
    """Not after a full epoch of training: the stage never reaches the loop."""
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    monkeypatch.setattr(common, "fit", lambda *args, **kwargs: pytest.fail("trained before the check"))
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", tmp_path / "t", *FAST,
                    "--checkpoint-root", blocker / "checkpoints")
    assert_failed_cleanly(code, err, 1, blocker / "checkpoints", "checkpoint_root")
    assert blocker.read_text() == "a file"


def test_a_one_class_dataset_is_an_error(make_imagefolder, tmp_path, capsys):
    source = make_imagefolder(tmp_path / "src", classes=1, train=2, val=1)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d")
    assert_failed_cleanly(code, err, 1, source / "train", "at least 2")


def test_a_coco_file_without_annotations_is_an_error(tmp_path, capsys):
    from conftest import write_coco

    annotations, images = write_coco(tmp_path / "coco", images=6, size=64)
    data = json.loads(annotations.read_text())
    data["annotations"] = []
    annotations.write_text(json.dumps(data))
    code, err = kdp(capsys, "stage", "prepare-data", "--source", annotations, "--images", images,
                    "--out", tmp_path / "d", "--image-size", "64", "--val-fraction", "0.4")
    assert_failed_cleanly(code, err, 1, "no boxes")


def test_a_one_class_detection_set_is_fine(tmp_path, capsys):
    from conftest import write_coco

    annotations, images = write_coco(tmp_path / "coco", images=8, size=64)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", annotations, "--images", images,
                    "--out", tmp_path / "d", "--image-size", "64", "--val-fraction", "0.4", "--categories", "red")
    assert code == 0, err
    assert read_manifest(str(tmp_path / "d"))["classes"] == ["red"]
    code, err = kdp(capsys, "stage", "detector", "--data", tmp_path / "d", "--out", tmp_path / "det", "--epochs", "1",
                    "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--backbone", "mobilenet_v3_small")
    assert code == 0, err
    assert read_manifest(str(tmp_path / "det"))["stage"] == "detector"


def test_an_lr_side_below_8_px_is_a_config_error(tmp_path, capsys):
    code, err = kdp(capsys, "stage", "teacher", "--data", tmp_path, "--out", tmp_path / "t", *FAST,
                    "--ratio", "32")
    assert_failed_cleanly(code, err, 2, "'ratio'", "LR side of 1 px")


def test_tiny_images_are_counted_and_warned_about(make_imagefolder, tmp_path, caplog):
    source = make_imagefolder(tmp_path / "src", classes=2, train=3, val=1, size=1)
    manifest = prepare_imagefolder(str(source), str(tmp_path / "d"))
    assert manifest["short_sides"] == {"1": 8}
    common.warn_small_images(str(tmp_path / "d"), manifest, 64)
    assert "8 of 8 images have a shorter side under 32 px" in caplog.text and str(tmp_path / "d") in caplog.text


def test_kdp_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    code, err = kdp(capsys, "stage", "teacher", "--data", tmp_path / "x", "--out", tmp_path / "t", "--ratio", "3",
                    "--debug")
    assert code == 2 and "Traceback" in err and "'hr_size'" in err
    monkeypatch.setenv("KDP_DEBUG", "1")
    assert "Traceback" in kdp(capsys, "stage", "teacher", "--data", "x", "--out", "y", "--ratio", "3")[1]


def test_the_kfp_entry_exits_with_the_message(tmp_path, capsys):
    from types import SimpleNamespace

    from components.kfp_entry import run_task

    wiring = {"stage": "teacher", "output": "model", "fixed": {"data": str(tmp_path)}, "params": [], "reads": {}}
    with pytest.raises(SystemExit) as exit_:
        run_task(wiring, {"settings": {"arch": "resnet19"}, "model": SimpleNamespace(uri=str(tmp_path / "t"))})
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'arch'" in err and "Traceback" not in err


def test_config_errors_exit_2_and_run_failures_exit_1(prepared, tmp_path, capsys):
    config = from_dict(teacher.TeacherConfig, {"data": prepared, "out": str(tmp_path / "t")})
    assert config.storage_timeout == 10 and not config.force and not config.restart
    assert kdp(capsys, "stage", "teacher", "--data", "d", "--out", "o", "--storage-timeout", "0")[0] == 2
    assert kdp(capsys, "stage", "teacher", "--data", tmp_path / "none", "--out", tmp_path / "t", *FAST)[0] == 1

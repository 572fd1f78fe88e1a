"""A stage reads only inside its inputs and writes only outside them (issue 36): an image path that
leaves its dataset's root (``..``, an absolute path, a symbolic link) is an error naming the file and
the entry, raised before anything outside is opened; an ``out`` inside an input, or holding one, is
refused at preflight; a ``memory://`` out, which dies with the process, is refused outside ``kdp run``."""

import json
import os
import shutil

import pytest
from PIL import Image

from conftest import write_coco, write_imagefolder
from test_reliability import FAST, assert_failed_cleanly, kdp, snapshot


@pytest.fixture
def outside(tmp_path):
    """An image outside every dataset of the test, as a secret beside the data would be."""
    (tmp_path / "secret").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "secret" / "s.png")
    return tmp_path / "secret" / "s.png"


def test_an_imagefolder_link_out_of_the_root_is_refused_unless_follow_links(tmp_path, outside, capsys):
    source = write_imagefolder(tmp_path / "src", classes=2, train=2, val=1)
    link = source / "train" / "class0" / "link.png"
    link.symlink_to(outside)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d")
    assert_failed_cleanly(code, err, 1, link, "train/class0/link.png", "follow_links")
    assert not (tmp_path / "d").exists()
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d", "--follow-links")
    assert code == 0, err


def test_an_imagefolder_folder_linked_out_of_the_root_is_refused(tmp_path, outside, capsys):
    source = write_imagefolder(tmp_path / "src", classes=2, train=2, val=1)
    (source / "val" / "class1" / "more").symlink_to(outside.parent)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d")
    assert_failed_cleanly(code, err, 1, source / "val" / "class1" / "more" / "s.png")


@pytest.mark.parametrize("escape", ["../secret/s.png", "../../../../../../../../etc/passwd", "/etc/passwd"])
def test_a_coco_file_name_out_of_the_images_is_refused_before_it_is_opened(tmp_path, outside, capsys, escape):
    annotations, images = write_coco(tmp_path / "coco", images=4, size=64)
    (tmp_path / "coco" / "secret").symlink_to(outside.parent)  # ../secret/s.png from images/
    data = json.loads(annotations.read_text())
    data["images"][2]["file_name"] = escape
    annotations.write_text(json.dumps(data))
    code, err = kdp(capsys, "stage", "prepare-data", "--source", annotations, "--images", images,
                    "--out", tmp_path / "d", "--image-size", "64")
    assert_failed_cleanly(code, err, 1, annotations, f"image {data['images'][2]['id']}", repr(escape), "outside")
    assert "corrupt" not in err  # refused from its name, not after reading it


def test_a_yolo_image_linked_out_of_the_root_is_refused(tmp_path, outside, capsys):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cat]\n")
    Image.new("RGB", (64, 64)).save(root / "images" / "train" / "a.png")
    (root / "images" / "train" / "b.png").symlink_to(outside)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", root, "--out", tmp_path / "d", "--image-size", "64")
    assert_failed_cleanly(code, err, 1, root / "images" / "train" / "b.png", "outside")


def test_prepare_data_into_its_own_source_is_refused_and_changes_nothing(imagefolder, capsys):
    before = snapshot(imagefolder)
    code, err = kdp(capsys, "stage", "prepare-data", "--source", imagefolder, "--out",
                    imagefolder / "train" / "prepared")
    assert_failed_cleanly(code, err, 2, imagefolder / "train" / "prepared", "lies inside the source input")
    assert snapshot(imagefolder) == before and not (imagefolder / "train" / "prepared").exists()


def test_an_out_holding_the_data_is_refused(prepared, tmp_path, capsys):
    data = shutil.copytree(prepared, tmp_path / "runs" / "data")
    code, err = kdp(capsys, "stage", "teacher", "--data", data, "--out", tmp_path / "runs", *FAST)
    assert_failed_cleanly(code, err, 2, tmp_path / "runs", "holds the data input")
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_an_out_inside_an_input_is_refused_for_uris_too(capsys):
    code, err = kdp(capsys, "stage", "export", "--model", "memory://runs/student", "--data", "memory://runs/data",
                    "--out", "memory://runs/student/export")
    assert_failed_cleanly(code, err, 2, "memory://runs/student/export", "model input")


def test_a_sibling_whose_name_starts_alike_is_not_inside(tmp_path):
    from kd_lib.io.fs import within

    assert within(str(tmp_path / "a" / "b"), str(tmp_path / "a"))
    assert not within(str(tmp_path / "ab"), str(tmp_path / "a"))
    assert within("gs://bucket/a/b/", "gs://bucket/a") and not within("gs://bucket/a", "memory://bucket/a")
    os.symlink(tmp_path / "a", tmp_path / "alias")
    assert within(str(tmp_path / "alias" / "x"), str(tmp_path / "a"))


def test_a_memory_out_is_refused(prepared, capsys):
    code, err = kdp(capsys, "stage", "teacher", "--data", prepared, "--out", "memory://runs/teacher", *FAST)
    assert_failed_cleanly(code, err, 2, "memory://runs/teacher", "vanishes")

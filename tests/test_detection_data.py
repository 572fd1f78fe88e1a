"""Detection data (COCO JSON, YOLO txt) and COCO mAP."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from kd_lib.config import ConfigError
from kd_lib.data.detection import keep_categories, read_coco, read_yolo
from kd_lib.data.imagefolder import DataError
from kd_lib.eval.detection import Detection, coco_map

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def write_coco(path, annotations, categories=({"id": 3, "name": "car"}, {"id": 1, "name": "person"})):
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 9, "file_name": "b.jpg", "width": 50, "height": 50}],
        "categories": list(categories), "annotations": annotations}))
    return str(path)


def annotation(id, bbox, category=1, image=7, **extra):
    return {"id": id, "image_id": image, "category_id": category, "bbox": bbox, **extra}


def test_coco_boxes_are_clipped_dropped_or_flagged_and_counted(tmp_path, caplog):
    uri = write_coco(tmp_path / "instances.json", [
        annotation(1, [10, 20, 30, 40], area=1000.0),           # inside: kept as is, COCO's area
        annotation(2, [90, 70, 20, 20], category=3),            # crosses the corner: clipped to 10 x 10
        annotation(3, [10, 10, 0, 5]),                          # zero width: dropped
        annotation(4, [120, 10, 5, 5]),                         # outside the image: dropped
        annotation(5, [0, 0, 50, 50], image=9, iscrowd=1),      # crowd: kept, flagged
    ])
    with caplog.at_level(logging.WARNING):
        dataset = read_coco(uri, str(tmp_path))
    assert dataset.categories == ["person", "car"]  # sorted by COCO id
    a, b = dataset.images
    assert a.boxes == [(10, 20, 40, 60), (90, 70, 100, 80)] and a.labels == [0, 1] and a.areas == [1000.0, 100.0]
    assert b.boxes == [(0, 0, 50, 50)] and b.crowd == [True]
    assert dataset.adjusted == {"boxes clipped to the image": 1, "degenerate boxes dropped": 2,
                                "crowd boxes (ignored by evaluation, left out of training)": 1}
    assert "2 degenerate boxes dropped" in caplog.text and "instances.json" in caplog.text


@pytest.mark.parametrize("annotations, words", [
    ([annotation(1, [0, 0, 5, 5], image=8)], "annotation 1 names image 8, which is not in 'images'"),
    ([annotation(2, [0, 0, 5, 5], category=5)], "annotation 2 names category 5, which is not in 'categories'"),
    ([{"id": 3, "image_id": 7, "category_id": 1}], "annotation 3: missing 'bbox'"),
])
def test_coco_errors_name_the_annotation(tmp_path, annotations, words):
    with pytest.raises(DataError, match=words):
        read_coco(write_coco(tmp_path / "instances.json", annotations), str(tmp_path))


def test_coco_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not JSON"):
        read_coco(str(tmp_path / "bad.json"), str(tmp_path))


def write_yolo(root, lines):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "train" / "x.jpg")
    Image.new("RGB", (40, 40)).save(root / "images" / "train" / "y.png")
    (root / "labels" / "train" / "x.txt").write_text(lines)
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")


def test_yolo_labels_become_absolute_corner_boxes(tmp_path):
    write_yolo(tmp_path, "1 0.5 0.5 0.2 0.4\n\n0 0.95 0.5 0.2 0.2\n")
    dataset = read_yolo(str(tmp_path), "train")
    assert dataset.categories == ["cat", "dog"]
    x, y = dataset.images
    assert (x.path, x.width, x.height, y.path, y.boxes) == ("images/train/x.jpg", 200, 100, "images/train/y.png", [])
    # (cx, cy, w, h) = (100, 50, 40, 40) -> (80, 30, 120, 70); (190, 50, 40, 20) -> (170, 40, 210, 60) clipped at 200
    assert x.boxes == [(80, 30, 120, 70), (170, 40, 200, 60)] and x.labels == [1, 0]
    assert dataset.adjusted == {"boxes clipped to the image": 1}


@pytest.mark.parametrize("line, words", [("1 0.5 0.5 0.2", r"x.txt:1: expected 'class cx cy w h'"),
                                         ("2 0.5 0.5 0.2 0.2", r"x.txt:1: class 2 is not in 0..1")])
def test_yolo_bad_lines_are_named_with_file_and_line(tmp_path, line, words):
    write_yolo(tmp_path, line + "\n")
    with pytest.raises(DataError, match=words):
        read_yolo(str(tmp_path), "train")


def test_map_of_a_box_shifted_by_hand(tmp_path):
    dataset = read_coco(write_coco(tmp_path / "i.json", [annotation(1, [0, 0, 40, 40])]), str(tmp_path))
    assert coco_map(dataset, [])["AP"] == 0.0
    # Shifted by 8 px: intersection 32 x 40 = 1280, union 2 * 1600 - 1280 = 1920, IoU 2/3:
    # a hit at IoU 0.50 .. 0.65 (4 of the 10 thresholds), a miss at 0.75.
    result = coco_map(dataset, [Detection(7, (8.0, 0.0, 48.0, 40.0), 0, 0.9)])
    assert result["AP50"] == 1.0 and result["AP75"] == 0.0 and result["AP"] == pytest.approx(0.4)
    assert result["APs"] is None and result["APm"] == pytest.approx(0.4)  # 40 x 40 is medium; no small box


def test_a_detection_on_a_crowd_region_is_not_a_false_positive(tmp_path):
    dataset = read_coco(write_coco(tmp_path / "i.json", [
        annotation(1, [0, 0, 40, 40]), annotation(2, [50, 20, 40, 40], iscrowd=1)]), str(tmp_path))
    hit = Detection(7, (0.0, 0.0, 40.0, 40.0), 0, 0.5)
    on_crowd = Detection(7, (52.0, 22.0, 88.0, 58.0), 0, 0.9)  # scored higher than the hit
    assert coco_map(dataset, [hit, on_crowd])["AP"] == 1.0
    with pytest.raises(ValueError, match="image 3, which is not in the dataset"):
        coco_map(dataset, [Detection(3, (0.0, 0.0, 1.0, 1.0), 0, 0.5)])


@pytest.mark.requires(COCO128.is_dir(), f"{COCO128} is not on this machine (the shared test data)")
def test_ground_truth_as_predictions_gives_ap_one_on_coco128():
    dataset = read_coco(str(COCO128 / "annotations" / "instances_train2017.json"), str(COCO128 / "train2017"))
    assert len(dataset.images) == 128 and len(dataset.categories) == 80
    assert sum(len(image.boxes) for image in dataset.images) + dataset.adjusted["degenerate boxes dropped"] == 939
    truth = [Detection(image.image_id, box, label, 1.0) for image in dataset.images
             for box, label, crowd in zip(image.boxes, image.labels, image.crowd) if not crowd]
    result = coco_map(dataset, truth)
    assert result == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": 1.0, "APm": 1.0, "APl": 1.0}


def test_keeping_some_categories_relabels_them_and_counts_the_rest(tmp_path, caplog):
    uri = write_coco(tmp_path / "instances.json", [
        annotation(1, [10, 20, 30, 40]), annotation(2, [0, 0, 20, 20], category=3),
        annotation(3, [5, 5, 10, 10], category=3, image=9)])
    dataset = read_coco(uri, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        cars = keep_categories(dataset, ["car"])
    assert cars.categories == ["car"] and len(cars.images) == 2  # an image without cars stays, as background
    assert [(image.boxes, image.labels) for image in cars.images] == [([(0, 0, 20, 20)], [0]),
                                                                     ([(5, 5, 15, 15)], [0])]
    assert cars.adjusted["annotations of other categories left out"] == 1
    assert "1 annotations of other categories left out (keeping car)" in caplog.text
    assert keep_categories(dataset, ["car", "person"]).images[0].labels == [1, 0]
    with pytest.raises(ConfigError, match=r"no categories \['dog'\]; it has \['person', 'car'\]"):
        keep_categories(dataset, ["dog"])

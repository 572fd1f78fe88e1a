"""The generated detection demo: a YOLO root that prepare-data reads, exact boxes, degraded stripes at LR."""

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lib.data.demo import DemoClass, _background, paint_object
from kd_lib.data.detection import read_yolo
from kd_lib.data.detection_demo import PERIOD_RANGE, _box, generate_detection_demo, image_rng, render_scene
from kd_lib.ops import downsample

SMALL = {"num_classes": 4, "train_images": 6, "val_images": 3, "size": 64}


def test_a_yolo_root_whose_labels_read_back_as_the_drawn_boxes(tmp_path):
    info = generate_detection_demo(str(tmp_path), **SMALL)
    assert info["classes"] == ["00_red_plain", "01_red_striped", "02_yellow_plain", "03_yellow_striped"]
    assert info["images"] == {"train": 6, "val": 3}
    for split, count in info["images"].items():
        dataset = read_yolo(str(tmp_path), split)
        assert dataset.categories == info["classes"] and len(dataset.images) == count
        assert sum(len(image.boxes) for image in dataset.images) == info["objects"][split]
        for index, image in enumerate(dataset.images):
            assert Image.open(tmp_path / image.path).size == (64, 64)
            _, drawn = render_scene(image_rng(0, split, index), 4, 64, 4)
            assert image.labels == [label for label, _ in drawn]
            np.testing.assert_allclose(image.boxes, [box for _, box in drawn], atol=1e-3)
    assert sum(info["objects"].values()) > len(info["images"])  # most images hold several objects


def test_boxes_are_the_extent_of_the_half_covered_pixels_and_objects_do_not_overlap():
    alpha = np.zeros((10, 12))
    alpha[2:5, 3:9] = 1.0
    alpha[5, 4] = 0.49
    assert _box(alpha) == (3, 2, 9, 5)
    assert _box(np.zeros((4, 4))) is None
    for index in range(20):
        _, objects = render_scene(image_rng(1, "train", index), 4, 128, 4)
        boxes = [box for _, box in objects]
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128 and min(x2 - x1, y2 - y1) >= 8
            for other in boxes[i + 1:]:
                overlap_w = min(x2, other[2]) - max(x1, other[0])
                overlap_h = min(y2, other[3]) - max(y1, other[1])
                assert min(overlap_w, overlap_h) <= 0 or overlap_w * overlap_h < 0.2 * (x2 - x1) * (y2 - y1)


def test_deterministic_and_other_parameters_are_refused(tmp_path):
    generate_detection_demo(str(tmp_path / "a"), seed=3, **SMALL)
    generate_detection_demo(str(tmp_path / "b"), seed=3, **SMALL)
    generate_detection_demo(str(tmp_path / "c"), seed=4, **SMALL)
    name = "images/train/00001.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    with pytest.raises(ValueError, match=r"other parameters: size=64 \(asked 128\)"):
        generate_detection_demo(str(tmp_path / "a"), **{**SMALL, "seed": 3, "size": 128})


def test_stripes_are_degraded_not_gone_at_half_resolution():
    """The same object drawn plain and striped: far apart at HR; at K = 2 an antialiased
    downsampling keeps part of the difference (the cue an LR detector learns poorly), an aliasing
    one more of it."""
    antialiased, aliased = [], []
    for index in range(8):
        background = _background(np.random.default_rng(index), 64, 0.5)
        pair = [paint_object(np.random.default_rng(100 + index), background, DemoClass("x", "red", surface), 0.3,
                             "square", np.array([32.0, 32.0]), 12.0, PERIOD_RANGE)[0]
                for surface in ("plain", "striped")]
        hr = torch.tensor(np.stack(pair), dtype=torch.float32).permute(0, 3, 1, 2)
        gap = lambda images: (images[0] - images[1]).pow(2).mean().sqrt().item()  # noqa: E731
        assert gap(hr) > 0.03, "the surfaces should differ visibly at HR"
        antialiased.append(gap(downsample(hr, 2, "bilinear")) / gap(hr))
        aliased.append(gap(downsample(hr, 2, "nearest")) / gap(hr))
    assert 0.1 < np.mean(antialiased) < 0.6, antialiased
    assert np.mean(aliased) > np.mean(antialiased) + 0.2, (aliased, antialiased)


def test_prepare_data_reads_the_generated_root(tmp_path):
    from components import prepare_data
    from kd_lib.config import from_dict

    info = generate_detection_demo(str(tmp_path / "demo"), **SMALL)
    manifest = prepare_data.run(from_dict(prepare_data.PrepareDataConfig, {
        "source": str(tmp_path / "demo"), "out": str(tmp_path / "data"), "image_size": 64}))
    assert (manifest["task"], manifest["classes"]) == ("detection", info["classes"])
    assert {s: (v["images"], v["boxes"]) for s, v in manifest["splits"].items()} == {
        split: (info["images"][split], info["objects"][split]) for split in ("train", "val")}

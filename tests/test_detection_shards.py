"""Prepared detection data: letterboxed shards, uint8 items with targets, their HR/LR pairing, and the ground truth."""

import json
import pickle
import logging
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from kd_lib.data.detection import DetectionSet, read_coco
from kd_lib.data.detection_shards import (DEGENERATE, PAD_COLOUR, DetectionShardDataset, collate_detection,
                                          prepare_detection)
from kd_lib.data.imagefolder import DataError
from kd_lib.data import parallel, shards
from kd_lib.data.shards import prepare_imagefolder
from kd_lib.eval.detection import Detection, coco_map
from kd_lib.io.manifest import read_manifest
from kd_lib.ops import downsample

COCO128 = Path(__file__).parents[1].parent / "shared/data/coco128"
SIZE = 64
RED, BLUE = (230, 20, 20), (20, 40, 200)
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def colour(rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255


def write_set(root: Path, name: str, images: list, annotations: list) -> DetectionSet:
    (root / name).write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return read_coco(str(root / name), str(root / "images"))


def image(id, file_name, width, height):
    return {"id": id, "file_name": file_name, "width": width, "height": height}


def annotation(id, image_id, bbox, category=1, **extra):
    return {"id": id, "image_id": image_id, "category_id": category, "bbox": bbox, **extra}


@pytest.fixture
def sets(tmp_path) -> tuple[DetectionSet, DetectionSet]:
    """Train: a wide image (a red box on blue), a tall one (a car and a crowd), a square one; val: one image."""
    folder = tmp_path / "images"
    folder.mkdir()
    wide = Image.new("RGB", (128, 64), BLUE)
    ImageDraw.Draw(wide).rectangle((20, 10, 59, 29), fill=RED)
    wide.save(folder / "a.png")
    Image.new("RGB", (48, 96), (30, 160, 30)).save(folder / "b.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "c.png")
    Image.new("RGB", (100, 50), (200, 200, 0)).save(folder / "d.png")
    train = write_set(tmp_path, "train.json", [image(1, "a.png", 128, 64), image(2, "b.png", 48, 96),
                                               image(3, "c.png", 64, 64)], [
        annotation(1, 1, [20, 10, 40, 20], area=800.0),
        annotation(2, 1, [20, 10, 1e-7, 5]),                # a sliver: one point at half size, dropped
        annotation(3, 2, [8, 16, 24, 48], category=3),
        annotation(4, 2, [0, 0, 48, 40], iscrowd=1),
        annotation(5, 3, [0, 0, 32, 32], category=3)])
    val = write_set(tmp_path, "val.json", [image(4, "d.png", 100, 50)], [annotation(6, 4, [50, 0, 50, 50])])
    return train, val


def prepare(sets, out, **kwargs) -> dict:
    train, val = sets
    return prepare_detection(train, str(out), SIZE, source="train.json", val=val, **kwargs)


def test_letterboxing_scales_boxes_and_pads_with_the_mean_colour(sets, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = prepare(sets, tmp_path / "data", shard_size=2)
    assert manifest["task"] == "detection" and manifest["classes"] == ["person", "car"]
    assert manifest["num_classes"] == 2 and manifest["image_size"] == SIZE and manifest["source"] == "train.json"
    assert {split: (s["images"], s["boxes"], len(s["shards"])) for split, s in manifest["splits"].items()} == {
        "train": (3, 4, 2), "val": (1, 1, 1)}
    assert manifest["adjusted"][DEGENERATE] == 1
    assert re.search(rf"a\.png: 1 {DEGENERATE} to {SIZE} px", caplog.text)

    dataset = DetectionShardDataset(str(tmp_path / "data"), "train")
    image, target = dataset[0]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == torch.uint8
    hr, lr = dataset.pairing(image[None])
    hr = hr[0]
    assert hr.shape == (3, SIZE, SIZE) and torch.equal(lr[0], hr) and 0 <= hr.min() and hr.max() <= 1
    # 128 x 64 at scale 1/2: the box (20, 10, 60, 30) becomes (10, 5, 30, 15), rows 32.. are padding
    assert target["boxes"].tolist() == [[10, 5, 30, 15]] and target["labels"].tolist() == [0]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    torch.testing.assert_close(hr[:, 7:13, 12:28], colour(RED).expand(3, 6, 16), atol=0.06, rtol=0)
    torch.testing.assert_close(hr[:, 18:30, 36:60], colour(BLUE).expand(3, 12, 24), atol=0.06, rtol=0)
    torch.testing.assert_close(hr[:, 34:], colour(PAD_COLOUR).expand(3, 30, SIZE), atol=0.02, rtol=0)
    truth = {i.image_id: i for i in dataset.ground_truth().images}
    assert (truth[1].width, truth[1].height, truth[1].areas) == (SIZE, SIZE, [200.0])
    # 48 x 96 at scale 2/3: (8, 16, 32, 64) -> (16/3, 32/3, 64/3, 128/3), the right 32 columns are padding
    assert truth[2].boxes[0] == pytest.approx((16 / 3, 32 / 3, 64 / 3, 128 / 3))
    assert truth[2].areas[0] == pytest.approx(24 * 48 * 4 / 9)


def test_a_split_is_streamed_a_row_group_at_a_time_with_its_annotations_in_memory(sets, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 1)  # one image per row group
    monkeypatch.setattr(shards, "CACHED_GROUPS", 2)
    prepare(sets, tmp_path / "data", shard_size=2)
    whole = DetectionShardDataset(str(tmp_path / "data"), "train")
    assert whole.blocks == [1, 1, 1] and "image" not in whole.table.column_names  # opening reads no image
    reads = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, group, **kw: reads.append(group) or read_row_group(self, group, **kw))
    for index in (2, 0, 2, 1, 0):
        image, target = whole[index]
        assert image.shape == (SIZE, SIZE, 3) and target["image_id"] == whole.image_ids[index]
    assert reads == [0, 0, 1, 0]  # shard 1's group, shard 0's two; the third image cached, the first evicted
    assert pickle.loads(pickle.dumps(whole)).cache == {}


def test_a_damaged_detection_shard_is_named_when_the_split_is_opened(sets, tmp_path):
    manifest = prepare(sets, tmp_path / "data")
    shard = tmp_path / "data" / manifest["paths"]["train-00000.parquet"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{shard}: .* bytes, but the manifest of .* promises"):
        DetectionShardDataset(str(tmp_path / "data"), "train")


def test_workers_give_the_same_shards_fingerprint_and_counts(sets, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(parallel, "FILES_PER_READ", 1)  # several reads for each shard of 2
    alone = prepare(sets, tmp_path / "alone", shard_size=2)
    with caplog.at_level(logging.WARNING):
        pooled = prepare(sets, tmp_path / "pooled", shard_size=2, num_workers=2)
    assert re.search(rf"a\.png: 1 {DEGENERATE} to {SIZE} px", caplog.text)  # logged here, found by a worker
    assert pooled["data_fingerprint"] == alone["data_fingerprint"]
    assert pooled["splits"] == alone["splits"] and pooled["adjusted"] == alone["adjusted"]
    assert alone["adjusted"][DEGENERATE] == 1
    stored = {name: [(root / path).read_bytes() for path in manifest["paths"].values()]
              for name, root, manifest in (("alone", tmp_path / "alone", alone),
                                           ("pooled", tmp_path / "pooled", pooled))}
    assert stored["pooled"] == stored["alone"] and len(stored["alone"]) == 3


def test_corrupt_image_is_named_and_nothing_is_published(sets, tmp_path):
    out = tmp_path / "data"
    first = prepare(sets, out, shard_size=1)
    files = sorted(p.name for p in out.iterdir())
    data = (tmp_path / "images" / "d.png").read_bytes()
    (tmp_path / "images" / "d.png").write_bytes(data[: len(data) // 2])
    for target in (tmp_path / "fresh", out):  # the val image is read last: train shards are already written
        with pytest.raises(DataError, match=r"corrupt image .*images/d\.png"):
            prepare(sets, target, shard_size=1)
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    assert sorted(p.name for p in out.iterdir()) == files and read_manifest(str(out)) == first


def test_empty_splits_are_named(sets, tmp_path):
    train, val = sets
    with pytest.raises(DataError, match=r"the val split is empty .*val_fraction 0\.0"):
        prepare_detection(train, str(tmp_path / "data"), SIZE, source="s", val_fraction=0.0)
    with pytest.raises(DataError, match=r"the train split is empty .*val_fraction 1\.0: lower it"):
        prepare_detection(train, str(tmp_path / "data"), SIZE, source="s", val_fraction=1.0)
    with pytest.raises(DataError, match=r"the val split is empty \(the val set has no images\)"):
        prepare_detection(train, str(tmp_path / "data"), SIZE, source="s",
                          val=DetectionSet(val.root, val.categories, []))
    assert not (tmp_path / "data").exists()


def test_hash_split_keeps_each_image_in_its_split_when_images_change(sets, tmp_path):
    train, val = sets
    every = DetectionSet(train.root, train.categories, train.images + val.images)
    # sha256 of the path: a.png 0.496, b.png 0.373, c.png 0.345, d.png 0.632 of 2**32
    splits = prepare_detection(every, str(tmp_path / "all"), SIZE, source="s", val_fraction=0.4)["splits"]
    assert (splits["train"]["images"], splits["val"]["images"]) == (2, 2)
    assert DetectionShardDataset(str(tmp_path / "all"), "val").paths == ["b.png", "c.png"]
    fewer = DetectionSet(train.root, train.categories, [i for i in every.images if i.path != "c.png"])
    prepare_detection(fewer, str(tmp_path / "fewer"), SIZE, source="s", val_fraction=0.4)
    assert DetectionShardDataset(str(tmp_path / "fewer"), "val").paths == ["b.png"]
    assert DetectionShardDataset(str(tmp_path / "fewer"), "train").paths == ["a.png", "d.png"]


def test_training_flip_moves_the_boxes_and_is_seeded(sets, tmp_path):
    prepare(sets, tmp_path / "data")
    plain = DetectionShardDataset(str(tmp_path / "data"), "train")
    augmented = DetectionShardDataset(str(tmp_path / "data"), "train", ratio=4, train=True)
    image, target = plain[0]
    flips = []
    for seed in range(8):
        flipped_image, flipped = augmented[(0, seed)]
        flips.append(random.Random(seed).random() < 0.5)
        if flips[-1]:
            assert torch.equal(flipped_image, image.flip(1))
            assert flipped["boxes"].tolist() == [[SIZE - 30, 5, SIZE - 10, 15]]
        else:
            assert torch.equal(flipped_image, image)
            assert flipped["boxes"].tolist() == target["boxes"].tolist()
        hr, lr = augmented.pairing(flipped_image[None])
        torch.testing.assert_close(lr, downsample(hr, 4))
        again = augmented[(0, seed)]
        assert torch.equal(again[0], flipped_image) and torch.equal(again[1]["boxes"], flipped["boxes"])
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("ratio, mode", [(2, "bilinear"), (4, "area"), (8, "bicubic")])
def test_lr_side_is_the_hr_side_over_the_ratio(sets, tmp_path, ratio, mode):
    prepare(sets, tmp_path / "data")
    dataset = DetectionShardDataset(str(tmp_path / "data"), "train", ratio=ratio, resize=mode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    hr, lr = dataset.pairing(images)
    assert hr.shape == (3, 3, SIZE, SIZE) and lr.shape == (3, 3, SIZE // ratio, SIZE // ratio)
    torch.testing.assert_close(lr, downsample(hr, ratio, mode))
    assert [t["image_id"] for t in targets] == [1, 2, 3]
    with pytest.raises(DataError, match=f"image_size {SIZE} is not divisible by ratio 3"):
        DetectionShardDataset(str(tmp_path / "data"), "train", ratio=3)


def test_collate_stacks_the_uint8_images_and_lists_the_targets(sets, tmp_path):
    prepare(sets, tmp_path / "data")
    dataset = DetectionShardDataset(str(tmp_path / "data"), "train", ratio=2, train=True)
    items = [dataset[(index, 3)] for index in range(3)]
    images, targets = collate_detection(items)
    assert images.dtype == torch.uint8 and images.shape == (3, SIZE, SIZE, 3)
    assert torch.equal(images, torch.stack([image for image, _ in items]))
    assert isinstance(targets, list) and len(targets) == 3
    assert all(target is item for target, (_, item) in zip(targets, items))


@pytest.mark.parametrize("mode", ["bilinear", "area", "bicubic", "nearest"])
def test_pairing_gives_the_image_in_unit_range_and_its_downsampled_copy(sets, tmp_path, mode):
    prepare(sets, tmp_path / "data")
    dataset = DetectionShardDataset(str(tmp_path / "data"), "train", ratio=4, resize=mode)
    images, _ = collate_detection([dataset[index] for index in range(len(dataset))])
    hr, lr = dataset.pairing(images)
    unit = images.permute(0, 3, 1, 2).float().mul_(1 / 255)  # the detectors normalize inside
    assert torch.equal(hr, unit) and torch.equal(lr, downsample(unit, 4, mode))


def test_crowd_boxes_are_left_out_of_targets_but_kept_in_the_ground_truth(sets, tmp_path):
    prepare(sets, tmp_path / "data")
    dataset = DetectionShardDataset(str(tmp_path / "data"), "train")
    target = dataset[1][1]
    assert target["image_id"] == 2 and target["labels"].tolist() == [1]
    truth = dataset.ground_truth().images[1]
    assert truth.labels == [1, 0] and truth.crowd == [False, True]
    assert truth.boxes[1] == pytest.approx((0, 0, 32, 80 / 3))


def test_ground_truth_boxes_as_detections_score_ap_one(sets, tmp_path):
    prepare(sets, tmp_path / "data")
    truth = DetectionShardDataset(str(tmp_path / "data"), "train").ground_truth()
    detections = [Detection(i.image_id, box, label, 1.0) for i in truth.images
                  for box, label, crowd in zip(i.boxes, i.labels, i.crowd) if not crowd]
    assert coco_map(truth, detections)["AP"] == 1.0


def test_rerun_replaces_the_output_and_leaves_no_stale_shards(sets, tmp_path):
    out = tmp_path / "data"
    first = prepare(sets, out, shard_size=1)
    second = prepare(sets, out, shard_size=1)
    stored = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert stored == sorted([*second["paths"].values(), "manifest.json"])
    assert not set(first["paths"].values()) & set(second["paths"].values())
    assert second["data_fingerprint"] == first["data_fingerprint"]


def test_classification_data_is_refused_by_name(make_imagefolder, tmp_path):
    source = make_imagefolder(tmp_path / "src", classes=2, train=1, val=1, size=8)
    prepare_imagefolder(str(source), str(tmp_path / "data"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'data'}: not prepared detection data "
                                                  "(task 'classification')")):
        DetectionShardDataset(str(tmp_path / "data"), "train")


@pytest.fixture(scope="module")
def coco128(tmp_path_factory, require):
    require(COCO128.is_dir(), f"real detection data not found at {COCO128} (see shared/data/README.md)")
    dataset = read_coco(str(COCO128 / "annotations/instances_train2017.json"), str(COCO128 / "train2017"))
    root = tmp_path_factory.mktemp("coco128")
    manifests = [prepare_detection(dataset, str(root / name), SIZE, source="coco128") for name in ("a", "b")]
    return dataset, str(root / "a"), manifests


def test_coco128_keeps_every_image_and_box(coco128):
    dataset, data, (manifest, _) = coco128
    splits = manifest["splits"]
    assert splits["train"]["images"] + splits["val"]["images"] == len(dataset.images) == 128
    assert splits["train"]["boxes"] + splits["val"]["boxes"] == sum(len(i.boxes) for i in dataset.images) == 939
    assert DEGENERATE not in manifest["adjusted"] and manifest["num_classes"] == 80
    truths = [DetectionShardDataset(data, split).ground_truth() for split in ("train", "val")]
    assert sum(sum(i.crowd) for truth in truths for i in truth.images) == 10


def test_coco128_targets_match_the_ground_truth_and_score_ap_one(coco128):
    _, data, _ = coco128
    dataset = DetectionShardDataset(data, "val", ratio=2)
    truth = dataset.ground_truth()
    for index in range(0, len(dataset), 5):
        pixels, target = dataset[index]
        _, lr = dataset.pairing(pixels[None])
        image = truth.images[index]
        assert lr.shape == (1, 3, SIZE // 2, SIZE // 2) and target["image_id"] == image.image_id
        expected = [list(box) for box, crowd in zip(image.boxes, image.crowd) if not crowd]
        assert target["boxes"].tolist() == expected
    detections = [Detection(i.image_id, box, label, 1.0) for i in truth.images
                  for box, label, crowd in zip(i.boxes, i.labels, i.crowd) if not crowd]
    assert coco_map(truth, detections)["AP"] == 1.0


def test_coco128_fingerprint_is_stable_across_outputs(coco128):
    _, _, (a, b) = coco128
    assert a["data_fingerprint"] == b["data_fingerprint"] and a["key"] == b["key"]
    assert a["paths"] != b["paths"]

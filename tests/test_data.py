import hashlib
import pickle
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from kd_lib.data.imagefolder import DataError
from kd_lib.data.sampler import EpochBatchSampler
from kd_lib.data import parallel, shards
from kd_lib.data.shards import ShardedImageDataset, prepare_imagefolder
from kd_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CropTransform, PairedResize
from kd_lib.engine.loop import paired_batches
from kd_lib.io import manifest as manifest_module
from kd_lib.io.manifest import read_manifest
from kd_lib.ops import downsample


def gradient_image(width=80, height=60) -> Image.Image:
    """Every pixel different: position is readable from the colour."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def unnormalize(t):
    return t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def normalize(t):
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.mark.parametrize("hr_size, ratio", [(64, 4), (64, 2), (32, 4), (48, 3), (56, 1)])
@pytest.mark.parametrize("train", [True, False])
def test_crop_is_uint8_hwc_and_pairs_to_exact_sizes(hr_size, ratio, train):
    transform = CropTransform(hr_size, ratio, train=train)
    crop = transform(gradient_image(), seed=5)
    assert crop.dtype == torch.uint8 and crop.shape == (hr_size, hr_size, 3)
    assert transform.pairing == PairedResize(ratio, "bilinear")
    hr, lr = transform.pairing(crop[None])
    assert hr.shape == (1, 3, hr_size, hr_size)
    assert lr.shape == (1, 3, hr_size // ratio, hr_size // ratio)


def downsample_by_hand(image: torch.Tensor, ratio: int, mode: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] downsampled without kd_lib: PIL's antialiased float resize for
    bilinear and bicubic, the block mean for area, each block's top-left pixel for nearest."""
    height, width = image.shape[-2] // ratio, image.shape[-1] // ratio
    if mode == "area":
        return image.reshape(3, height, ratio, width, ratio).mean((2, 4))
    if mode == "nearest":
        return image[:, ::ratio, ::ratio]
    pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    return torch.stack([torch.from_numpy(np.array(Image.fromarray(channel.numpy(), mode="F").resize(
        (width, height), pil_filter))) for channel in image])


@pytest.mark.parametrize("mode", ["bilinear", "area", "bicubic", "nearest"])
def test_lr_is_the_same_crop_downsampled(mode):
    transform = CropTransform(64, 4, train=True, resize=mode)
    for seed in range(5):
        crop = transform(gradient_image(), seed)
        hr, lr = transform.pairing(crop[None])
        image = crop.permute(2, 0, 1).float() / 255
        torch.testing.assert_close(unnormalize(hr[0]), image, atol=1e-5, rtol=0)
        torch.testing.assert_close(unnormalize(lr[0]), downsample_by_hand(image, 4, mode), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "area", "bicubic", "nearest"])
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_pairing_a_batch_is_exactly_the_float_path(mode, ratio):
    """The pair made on the device equals, bit for bit, normalizing the crop scaled to [0, 1]
    (as ``TF.to_dtype(scale=True)``) and its downsampled copy, sample by sample."""
    transform = CropTransform(64, ratio, train=True, resize=mode)
    crops = torch.stack([transform(gradient_image(), seed) for seed in range(4)])
    hr, lr = transform.pairing(crops)
    for crop, hr_sample, lr_sample in zip(crops, hr, lr):
        x = TF.to_dtype(crop.permute(2, 0, 1), torch.float32, scale=True)
        assert torch.equal(hr_sample, normalize(x))
        assert torch.equal(lr_sample, normalize(downsample(x[None], ratio, mode)[0]))


def test_area_downsampling_is_the_block_mean_and_bilinear_is_antialiased():
    image = torch.rand(1, 3, 16, 16)
    area = downsample(image, 4, "area")
    torch.testing.assert_close(area[0, :, 0, 0], image[0, :, :4, :4].mean((1, 2)))
    stripes = torch.zeros(1, 1, 16, 16)
    stripes[..., ::2] = 1.0  # period 2: far above the LR Nyquist limit
    assert downsample(stripes, 4, "bilinear").std() < 0.05
    assert downsample(stripes, 4, "nearest").std() == 0 and downsample(stripes, 4, "nearest").mean() == 1


def test_crops_are_seeded():
    transform = CropTransform(32, 4, train=True)
    image = gradient_image()
    a, b, c = transform(image, 1), transform(image, 1), transform(image, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_transform_is_a_central_square():
    transform = CropTransform(60, 4, train=False)
    hr, _ = transform.pairing(transform(gradient_image(80, 60))[None])
    red = unnormalize(hr[0])[0]
    # the central 60 of 80 columns: red runs from 10/80 to 70/80 of full scale
    assert abs(red[0, 0].item() - 10 / 80) < 0.02 and abs(red[0, -1].item() - 69 / 80) < 0.02


def test_resumed_sampler_continues_the_same_epoch():
    full = list(EpochBatchSampler(50, 8, seed=3, epoch=2))
    assert len(full) == 6 and len({i for b in full for i, _ in b}) == 48
    assert list(EpochBatchSampler(50, 8, seed=3, epoch=2, start_batch=4)) == full[4:]
    assert list(EpochBatchSampler(50, 8, seed=3, epoch=3)) != full


def paths(dataset):
    """Every image's path in the dataset's order, read from its shards."""
    return [path for uri in dataset.files for path in pq.read_table(uri, columns=["path"]).column("path").to_pylist()]


def test_prepare_reads_every_image_and_converts_to_rgb(imagefolder):
    Image.new("L", (20, 30), 128).save(imagefolder / "train" / "class0" / "gray.png")
    Image.new("CMYK", (20, 30), (0, 50, 100, 0)).save(imagefolder / "train" / "class1" / "cmyk.jpg")
    manifest = prepare_imagefolder(str(imagefolder), str(imagefolder.parent / "data"))
    assert manifest["classes"] == ["class0", "class1", "class2"]
    assert manifest["splits"]["train"]["images"] == 3 * 12 + 2
    dataset = ShardedImageDataset(str(imagefolder.parent / "data"), "train", CropTransform(32, 4, train=False))
    index = paths(dataset).index("train/class1/cmyk.jpg")
    image, label = dataset[index]
    assert image.shape == (32, 32, 3) and image.dtype == torch.uint8 and label == 1
    assert dataset.pairing == PairedResize(4)
    hr, lr = dataset.pairing(image[None])
    assert hr.shape == (1, 3, 32, 32) and lr.shape == (1, 3, 8, 8)


def test_paired_batches_pair_each_uint8_batch_of_a_loader(prepared):
    dataset = ShardedImageDataset(prepared, "val", CropTransform(32, 4, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)
    count = 0
    for (images, labels), (hr, lr, moved) in zip(loader, paired_batches(loader, dataset.pairing, "cpu")):
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
        expected_hr, expected_lr = dataset.pairing(images)
        assert torch.equal(hr, expected_hr) and torch.equal(lr, expected_lr) and torch.equal(moved, labels)
        count += len(labels)
    assert count == len(dataset)


def test_fingerprint_depends_on_content_not_location(imagefolder, tmp_path):
    first = prepare_imagefolder(str(imagefolder), str(tmp_path / "a"))
    fs = fsspec.filesystem("memory")
    fs.put(str(imagefolder), "/copy", recursive=True)
    try:
        second = prepare_imagefolder("memory://copy", "memory://prepared")
        assert second["data_fingerprint"] == first["data_fingerprint"]
        assert read_manifest("memory://prepared")["source"] == "memory://copy"
    finally:
        fs.rm("/copy", recursive=True)
        fs.rm("/prepared", recursive=True)
    (imagefolder / "val" / "class2" / "000.png").unlink()
    assert prepare_imagefolder(str(imagefolder), str(tmp_path / "b"))["data_fingerprint"] != first["data_fingerprint"]


def test_max_per_class_keeps_the_first_images_of_each_class(imagefolder, tmp_path):
    full = prepare_imagefolder(str(imagefolder), str(tmp_path / "full"))
    subset = prepare_imagefolder(str(imagefolder), str(tmp_path / "subset"), max_per_class=3)
    assert (subset["splits"]["train"]["images"], subset["splits"]["val"]["images"]) == (9, 9)
    dataset = ShardedImageDataset(str(tmp_path / "subset"), "train", CropTransform(32, 4, train=False))
    assert sorted(paths(dataset)) == [f"train/class{c}/{i:03d}.png" for c in range(3) for i in range(3)]
    assert subset["data_fingerprint"] != full["data_fingerprint"]


def test_a_split_is_read_a_row_group_at_a_time_through_a_bounded_cache(imagefolder, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 1)  # one image per row group
    monkeypatch.setattr(shards, "CACHED_GROUPS", 4)
    prepare_imagefolder(str(imagefolder), str(tmp_path / "data"), shard_size=10)
    dataset = ShardedImageDataset(str(tmp_path / "data"), "train", CropTransform(32, 4, train=False))
    assert len(dataset.files) == 4 and dataset.blocks == [1] * 36 and len(dataset) == 36
    assert set(dataset.labels[:10].tolist()) == {0, 1, 2}  # written shuffled: a shard holds every class
    reads = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, group, **kw: reads.append(group) or read_row_group(self, group, **kw))
    for index in (0, 0, 11, 0, 25, 35, 2, 3, 35):
        image, label = dataset[index]
        assert label == dataset.labels[index] and image.shape == (32, 32, 3)
    assert reads == [0, 1, 5, 5, 2, 3]  # 0 and 35 come from the cache; a row group's number is per shard
    assert list(dataset.cache) == [25, 2, 3, 35]  # the last CACHED_GROUPS blocks read, least recent first
    assert pickle.loads(pickle.dumps(dataset)).cache == {}  # a loader worker starts with an empty cache


def test_a_damaged_shard_is_named_when_the_split_is_opened(imagefolder, tmp_path):
    manifest = prepare_imagefolder(str(imagefolder), str(tmp_path / "data"))
    shard = tmp_path / "data" / manifest["paths"]["train-00000.parquet"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{shard}: .* bytes, but the manifest of .* promises"):
        ShardedImageDataset(str(tmp_path / "data"), "train", CropTransform(32, 4, train=False))


def test_the_windowed_shuffle_reads_few_blocks_per_batch_and_is_a_permutation():
    blocks = [7, 5, 9, 6, 8, 5, 10, 6]
    sampler = EpochBatchSampler(56, 8, seed=1, epoch=2, blocks=blocks, window=3)
    batches = list(sampler)
    flat = [index for batch in batches for index, _ in batch]
    assert len(flat) == 56 and sorted(flat) == list(range(56))
    starts = np.cumsum([0, *blocks])
    for batch in batches:
        touched = {int(np.searchsorted(starts, index, side="right")) - 1 for index, _ in batch}
        assert len(touched) <= 2 * 3  # the blocks of at most two consecutive windows
    assert batches == list(EpochBatchSampler(56, 8, seed=1, epoch=2, blocks=blocks, window=3))
    assert list(EpochBatchSampler(56, 8, seed=1, epoch=2, start_batch=3, blocks=blocks, window=3)) == batches[3:]
    # few blocks: the plain permutation, as without blocks
    assert list(EpochBatchSampler(56, 8, seed=1, epoch=2, blocks=blocks, window=8)) == \
        list(EpochBatchSampler(56, 8, seed=1, epoch=2))
    with pytest.raises(ValueError, match="blocks of 56 items in all, but 50 items"):
        EpochBatchSampler(50, 8, seed=1, epoch=2, blocks=blocks)


def assert_nothing_published(out):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_corrupt_image_is_named_and_nothing_is_published(imagefolder, tmp_path):
    data = (imagefolder / "train" / "class2" / "005.png").read_bytes()
    (imagefolder / "train" / "class2" / "005.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"corrupt image .*train/class2/005\.png"):
        prepare_imagefolder(str(imagefolder), str(out), shard_size=8)
    assert_nothing_published(out)


def test_empty_class_folder_is_named(imagefolder, tmp_path):
    shutil.rmtree(imagefolder / "val" / "class1")
    (imagefolder / "val" / "class1").mkdir()
    (imagefolder / "val" / "class1" / "notes.txt").write_text("no images here")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"empty class folder .*val/class1"):
        prepare_imagefolder(str(imagefolder), str(out))
    assert_nothing_published(out)


def test_classes_must_match_between_splits(imagefolder, tmp_path):
    shutil.rmtree(imagefolder / "val" / "class2")
    with pytest.raises(DataError, match=r"val: classes differ from train/: missing \['class2'\]"):
        prepare_imagefolder(str(imagefolder), str(tmp_path / "data"))
    with pytest.raises(DataError, match="no train/ folder"):
        prepare_imagefolder(str(tmp_path / "nowhere"), str(tmp_path / "data"))


def test_failed_prepare_leaves_the_earlier_output_whole(imagefolder, tmp_path):
    out = tmp_path / "data"
    first = prepare_imagefolder(str(imagefolder), str(out), shard_size=10)

    def stored() -> list[str]:
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

    files = stored()
    (imagefolder / "train" / "class0" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        prepare_imagefolder(str(imagefolder), str(out), shard_size=10)
    assert stored() == files
    assert read_manifest(str(out)) == first
    assert len(ShardedImageDataset(str(out), "train", CropTransform(32, 4, train=False))) == 36
    (imagefolder / "train" / "class0" / "bad.png").unlink()
    second = prepare_imagefolder(str(imagefolder), str(out), shard_size=10)
    assert stored() == sorted([*second["paths"].values(), "manifest.json"])  # the first output's shards are gone
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", second["paths"]["train-00000.parquet"]
                                                            .split("/")[0]])


def test_unreachable_location_is_named(tmp_path):
    from kd_lib.io.fs import StorageError

    with pytest.raises(StorageError, match=r"cannot list http://127\.0\.0\.1:9/data/train"):
        prepare_imagefolder("http://127.0.0.1:9/data", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_list_files_on_the_local_disk_is_fsspecs_listing(tmp_path):
    from kd_lib.io.fs import list_files

    files = {"b.png": b"1", "a/2.png": b"22", "a/deep/3.png": b"333", ".hidden": b""}
    memory = fsspec.filesystem("memory")
    for name, data in files.items():
        (tmp_path / "root" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / name).write_bytes(data)
        memory.pipe(f"/listing/root/{name}", data)
    expected = sorted(files)
    assert list_files(str(tmp_path / "root")) == list_files("memory://listing/root") == expected
    assert list_files(str(tmp_path / "root") + "/") == expected
    assert list_files(str(tmp_path / "missing")) == list_files("memory://listing/missing") == []


def test_the_listing_fingerprint_changes_exactly_when_files_do(tmp_path):
    from kd_lib.io.fs import listing_fingerprint

    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "1.txt").write_text("one")
    (tmp_path / "labels.json").write_text("{}")
    folder, file = str(tmp_path / "data"), str(tmp_path / "labels.json")
    first = listing_fingerprint(folder, file)
    assert listing_fingerprint(folder, file) == first
    (tmp_path / "data" / "a" / "1.txt").write_text("uno!")  # rewritten: another size
    second = listing_fingerprint(folder, file)
    assert second != first
    (tmp_path / "data" / "a" / "2.txt").write_text("two")
    assert listing_fingerprint(folder, file) != second
    with pytest.raises(FileNotFoundError, match="missing"):
        listing_fingerprint(str(tmp_path / "missing"))


def shard_bytes(out) -> dict[str, bytes]:
    """Each published shard's bytes by its name (the run folder left out)."""
    manifest = read_manifest(str(out))
    return {name: (out / path).read_bytes() for name, path in manifest["paths"].items()}


def test_workers_give_the_same_shards_and_fingerprint(imagefolder, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "FILES_PER_READ", 8)  # several reads for each shard, 6 shards for 2 workers
    Image.new("L", (20, 30), 128).save(imagefolder / "train" / "class0" / "gray.png")  # a 16 px short side
    alone = prepare_imagefolder(str(imagefolder), str(tmp_path / "alone"), shard_size=10)
    pooled = prepare_imagefolder(str(imagefolder), str(tmp_path / "pooled"), shard_size=10, num_workers=2)
    assert pooled["data_fingerprint"] == alone["data_fingerprint"]
    assert pooled["short_sides"] == alone["short_sides"] == {"16": 1, "32": 48}
    assert shard_bytes(tmp_path / "pooled") == shard_bytes(tmp_path / "alone")
    assert len(shard_bytes(tmp_path / "alone")) == 6  # 37 train, 12 val images in shards of 10


def test_the_manifest_holds_the_hashes_the_workers_took_of_the_shards_they_wrote(imagefolder, tmp_path, monkeypatch):
    read_back = []
    monkeypatch.setattr(manifest_module, "read_bytes", lambda uri: read_back.append(uri))
    manifest = prepare_imagefolder(str(imagefolder), str(tmp_path / "data"), shard_size=10, num_workers=2)
    assert read_back == []  # publishing read no shard back
    stored = shard_bytes(tmp_path / "data")
    assert len(stored) == 6
    assert manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in stored.items()}
    assert manifest["sizes"] == {name: len(data) for name, data in stored.items()}


def test_a_corrupt_image_found_by_a_worker_is_named_and_nothing_is_published(imagefolder, tmp_path):
    (imagefolder / "val" / "class1" / "004.png").write_bytes(b"not an image")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"corrupt image .*val/class1/004\.png"):
        prepare_imagefolder(str(imagefolder), str(out), num_workers=2)
    assert_nothing_published(out)


@pytest.mark.parametrize("values", [[b"a", b"", b"\x00\xffbc"], [], [b""]])
def test_binary_array_is_pyarrows(values):
    assert shards.binary_array(values).equals(pa.array(values, pa.binary()))


def test_binary_array_past_2_gib_is_pyarrows_chunks():
    big = b"x" * (1 << 30)
    assert isinstance(shards.binary_array([big, big]), pa.ChunkedArray)


def test_a_batch_larger_than_the_training_split_is_a_bad_batch_size_setting(prepared, capsys):
    """A bad setting, exit 2 in one line naming the field: not a traceback from inside training."""
    from components import teacher
    from components.common import stage_cli

    code = stage_cli(teacher.TeacherConfig, teacher.run, ["--data", prepared, "--out", str(Path(prepared).parent / "t"),
                     "--arch", "resnet18", "--epochs", "1", "--hr-size", "32", "--num-workers", "0",
                     "--batch-size", "4096"], "kdp stage teacher", "")
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and "field 'batch_size'" in line and "fewer than one batch of 4096" in line


def test_files_that_are_not_images_are_skipped_and_counted(imagefolder, tmp_path, caplog):
    import logging

    from components.prepare_data import PrepareDataConfig, run
    from kd_lib.config import from_dict

    for split in ("train", "val"):
        folder = next(p for p in sorted((imagefolder / split).iterdir()) if p.is_dir())
        (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        manifest = run(from_dict(PrepareDataConfig, {"source": str(imagefolder), "out": str(tmp_path / "prepared")}))
    assert "skipped 2 files that are not images" in caplog.text and "notes.txt" in caplog.text
    assert manifest["splits"]["train"]["images"] == len(list((imagefolder / "train").rglob("*.png")))


def test_an_error_during_prepare_data_starts_on_a_line_of_its_own(imagefolder, tmp_path, capsys):
    """The progress bar's line ends before the error is printed."""
    from components import prepare_data
    from components.common import stage_cli

    next((imagefolder / "val").rglob("*.png")).write_bytes(b"\x89PNG not really")
    code = stage_cli(prepare_data.PrepareDataConfig, prepare_data.run,
                     ["--source", str(imagefolder), "--out", str(tmp_path / "prepared"), "--num-workers", "0"],
                     "kdp stage prepare-data", "")
    err = capsys.readouterr().err
    assert code == 1 and "\nkdp stage prepare-data: error: " in err, err

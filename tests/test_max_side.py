"""prepare-data --max-side: images stored with their shorter side bounded, and a training stage whose hr_size the
bound does not allow refused before it reads an image."""

import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import common
from kd_lib.config import ConfigError
from kd_lib.data.imagefolder import BOUNDED_QUALITY
from kd_lib.data.shards import prepare_imagefolder
from kd_lib.io.manifest import read_manifest
from pipelines import cli

#: name: (size, format) of the train images of class0 beside the plain ones every class folder holds
IMAGES = {"wide.jpg": ((300, 100), "JPEG"), "tall.png": ((60, 180), "PNG"), "small.png": ((40, 50), "PNG"),
          "edge.jpg": ((48, 64), "JPEG")}
MAX_SIDE = 48


@pytest.fixture
def source(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "src" / "train" / "class0"
    folder.mkdir(parents=True)
    for name, ((width, height), kind) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name, kind)
    for split in ("train", "val"):
        for label in range(2):
            (tmp_path / "src" / split / f"class{label}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (50 * label, 0, 0)).save(tmp_path / "src" / split / f"class{label}" / "plain.png")
    return tmp_path / "src"


def stored(data: str) -> dict[str, bytes]:
    """Every image's stored bytes by its path, read from the shards."""
    manifest = read_manifest(data)
    rows = {}
    for split in manifest["splits"].values():
        for name in split["shards"]:
            table = pq.read_table(Path(data) / manifest["paths"].get(name, name), columns=["path", "image"])
            rows.update(zip(table.column("path").to_pylist(), table.column("image").to_pylist()))
    return rows


def jpeg_tables(quality: int) -> dict:
    """The quantization tables Pillow writes at ``quality``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).quantization


def test_images_larger_than_max_side_are_stored_bounded_on_their_shorter_side(source, tmp_path):
    manifest = prepare_imagefolder(str(source), str(tmp_path / "data"), max_side=MAX_SIDE)
    assert manifest["max_side"] == MAX_SIDE
    images = stored(str(tmp_path / "data"))
    for name, ((width, height), _) in IMAGES.items():
        data = images[f"train/class0/{name}"]
        image = Image.open(io.BytesIO(data))
        if min(width, height) <= MAX_SIDE:  # as they were, byte for byte
            assert data == (source / "train" / "class0" / name).read_bytes(), name
        else:  # the shorter side at MAX_SIDE, the aspect kept, as a JPEG of quality 90
            scale = MAX_SIDE / min(width, height)
            assert image.size == (round(width * scale), round(height * scale)), name
            assert image.format == "JPEG" and image.quantization == jpeg_tables(BOUNDED_QUALITY), name
    # the stored sizes are counted: the wide image's shorter side is 48 (bucket 32), not 100 (64)
    assert manifest["short_sides"] == {"32": 8}
    unbounded = prepare_imagefolder(str(source), str(tmp_path / "as-they-are"))
    assert unbounded["max_side"] == 0 and unbounded["short_sides"] == {"32": 7, "64": 1}
    assert all(data == (source / path).read_bytes() for path, data in stored(str(tmp_path / "as-they-are")).items())
    assert unbounded["data_fingerprint"] != manifest["data_fingerprint"]
    again = prepare_imagefolder(str(source), str(tmp_path / "again"), max_side=MAX_SIDE, num_workers=2)
    assert again["data_fingerprint"] == manifest["data_fingerprint"]  # the re-encoding is deterministic


def kdp(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_negative_max_side_and_a_detection_source_with_one_are_config_errors(source, tmp_path, capsys):
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "d", "--max-side", "-1")
    assert code == 2 and "max_side" in err and "-1" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "coco.json").write_text("{}")
    code, err = kdp(capsys, "stage", "prepare-data", "--source", tmp_path / "coco.json", "--images", source,
                    "--out", tmp_path / "d", "--max-side", "64")
    assert code == 2 and "max_side" in err and "letterboxed" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_a_training_stage_with_hr_size_above_max_side_stops_at_preflight(source, tmp_path, capsys):
    code, err = kdp(capsys, "stage", "prepare-data", "--source", source, "--out", tmp_path / "data",
                    "--max-side", MAX_SIDE)
    assert code == 0, err
    assert read_manifest(str(tmp_path / "data"))["max_side"] == MAX_SIDE
    code, err = kdp(capsys, "stage", "teacher", "--data", tmp_path / "data", "--out", tmp_path / "t",
                    "--hr-size", 64, "--ratio", 4, "--epochs", 1, "--device", "cpu", "--num-workers", 0)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(rf"hr_size.*\b64\b.*{re.escape(str(tmp_path / 'data'))}.*max_side {MAX_SIDE}\b", lines[0]), err
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_hr_size_up_to_max_side_passes_and_data_prepared_before_it_have_no_bound():
    common.check_max_side("d", {"max_side": 48}, 48)
    common.check_max_side("d", {"max_side": 0}, 512)
    common.check_max_side("d", {}, 512)  # a manifest written before max_side
    with pytest.raises(ConfigError, match="hr_size.*49.*data d .*max_side 48"):
        common.check_max_side("d", {"max_side": 48}, 49)

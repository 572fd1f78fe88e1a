"""Damaged shard bytes of the right size are caught where the data is read (issue 36): each Parquet
page carries its CRC-32 and a reader checks every page it reads, so a flipped byte stops the stage with
one line naming the shard instead of training on it."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kd_lib.io.manifest import read_manifest
from test_reliability import FAST, assert_failed_cleanly, kdp


def flip(shard: Path, start: int, count: int, mask: int) -> None:
    """XOR ``count`` bytes of ``shard`` from ``start`` with ``mask``: the size stays the same."""
    data = bytearray(shard.read_bytes())
    data[start:start + count] = bytes(b ^ mask for b in data[start:start + count])
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["labels", "images"])
def test_flipped_shard_bytes_are_named(prepared, tmp_path, capsys, where):
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    shard = data / read_manifest(str(data))["paths"]["train-00000.parquet"]
    columns = pq.ParquetFile(shard).metadata.row_group(0)
    if where == "labels":  # the labels' dictionary (0, 1, 2) ends where their data page starts: 0 <-> 1
        flip(shard, columns.column(1).data_page_offset - 12, 1, 1)
        flip(shard, columns.column(1).data_page_offset - 8, 1, 1)
    else:  # 64 bytes in the middle of the images
        image = columns.column(0)
        flip(shard, image.dictionary_page_offset + image.total_compressed_size // 2, 64, 0xFF)
    code, err = kdp(capsys, "stage", "teacher", "--data", data, "--out", tmp_path / "t", *FAST)
    assert_failed_cleanly(code, err, 1, shard, "damaged")
    assert not (tmp_path / "t" / "manifest.json").exists()
